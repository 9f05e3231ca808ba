"""EdgeChoice, Derive, Prune, FoldIdentities: parity, gradients, choice rules, numerical equality."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import archir
from archir.passes.base import PassManager
from archir.passes.derive import Derive, FoldIdentities, Prune
from archir.passes.edge_choice import (SLOTS, EdgeChoice, EdgeMix, arch_parameters, project_thetas,
                                       valid_choices)
from model_patterns import (MODELS, assert_same, call, derive_and_check_one_hot, load_example,
                            nontrivial_batch_norms, random_like)

SEARCHABLE = ["resnet20", "mobilenetv2", "darts_cell", "mbconv"]


def _example(name):
    ex = load_example(name)
    torch.manual_seed(0)
    return ex.build_model().eval(), ex.example_input()


def _supernet(model, x, share):
    g = archir.trace(model, x)
    PassManager([EdgeChoice(share)])(g)  # verifies after the pass
    return g, g.to_module().eval()


@pytest.mark.parametrize("name", SEARCHABLE)
@pytest.mark.parametrize("share", ["cell", "full"])
def test_supernet_is_exactly_the_original_at_initialisation(name, share):
    model, x = _example(name)
    g, sup = _supernet(model, x, share)
    assert arch_parameters(g), "the pass made no choices"
    for seed in (0, 1):
        xi = random_like(x, seed)
        assert_same(model(xi), sup(xi))


@pytest.mark.parametrize("name", ["residual", "dense", "squeeze_excite", "transformer", "two_in_dict_out"])
def test_supernet_parity_on_test_models(name):
    ctor, make_input = MODELS[name]
    torch.manual_seed(0)
    model = ctor().eval()
    g, sup = _supernet(model, make_input(), "full")
    xi = random_like(make_input(), 3)
    assert_same(call(model, xi), call(sup, xi))


def test_every_choice_receives_gradient():
    model, x = _example("resnet20")
    g, sup = _supernet(model, x, "full")
    sup(x).square().mean().backward()
    mixers = {e.labels["param"]: e.labels["choices"].split(",") for e in g.edges.values() if e.ops[0].kind == "choice"}
    thetas = dict(g.root.archir_theta.items())
    for name, choices in mixers.items():
        grad = thetas[name].grad
        # at initialisation θ_same's gradient is 0 (the mix already equals o(x)); none and identity move
        for c in choices:
            if c != "same":
                assert grad[SLOTS.index(c)] != 0, (name, c)
    # away from initialisation all three choices get gradient
    for p in thetas.values():
        p.grad = None
        with torch.no_grad():
            p.copy_(torch.tensor([0.2, 0.3, 0.5]))
    sup(x).square().mean().backward()
    for name, choices in mixers.items():
        grad = thetas[name].grad
        assert all(grad[SLOTS.index(c)] != 0 for c in choices), (name, choices, grad)


def test_linear_mix_gives_none_no_gradient_the_normalised_mix_does():
    """The paper's Eq. (1) (``form="linear"``) gives θ_none no gradient (none wins only when θ_id and
    θ_same go below 0, see test_dnat_space.py); the normalised mix gives it −o_e/Σθ."""
    x = torch.randn(4, 3)
    theta = torch.tensor([0.0, 0.0, 1.0], requires_grad=True)
    (theta[0] * torch.zeros_like(x) + theta[1] * x + theta[2] * x.tanh()).sum().backward()
    assert theta.grad[0] == 0
    want = theta.grad.clone()
    theta.grad = None
    EdgeMix(("none", "identity", "same"), form="linear")(x, x.tanh(), theta=theta).sum().backward()
    torch.testing.assert_close(theta.grad, want)
    theta.grad = None
    EdgeMix(("none", "identity", "same"))(x, x.tanh(), theta=theta).sum().backward()
    assert theta.grad[0] != 0


def test_choice_rules():
    model, x = _example("resnet20")
    g = archir.trace(model, x)
    c = {e.id: valid_choices(g, e) for e in g.edges.values()}
    assert c["e0"] == ("same",)  # stem changes shape, does not end at a sum
    assert c["e1"] == ("identity", "same")  # conv-bn-relu keeps the shape
    assert c["e2"] == ("none", "identity", "same")  # residual branch into a sum
    assert c["e3"] == ("none", "same")  # the direct shortcut: identity is what it already is
    assert c["e15"] == ("none", "same")  # downsampling shortcut: shape changes, ends at a sum
    assert c["e36"] == ("same",)  # the head
    PassManager([EdgeChoice("full")])(g)
    assert g.edges["e0"].ops[0].kind != "choice" and g.edges["e36"].ops[0].kind != "choice"
    assert g.edges["e1"].labels["why"] == g.edges["e2"].labels["why"] == g.edges["e15"].labels["why"] \
        == "parametrised: conv/linear (+ norm)"
    assert g.edges["e3"].labels["why"] == "shortcut into a sum"


def test_cell_sharing_ties_repeated_blocks():
    model, x = _example("resnet20")
    gc, _ = _supernet(model, x, "cell")
    gf, _ = _supernet(model, x, "full")
    assert len(arch_parameters(gc)) < len(arch_parameters(gf))
    by_theta = {}
    for e in gc.edges.values():
        if "param" in e.labels:
            by_theta.setdefault(e.labels["param"], set()).add(e.group)
    assert all(len(groups) == 1 for groups in by_theta.values())
    assert max(len([e for e in gc.edges.values() if e.labels.get("param") == t]) for t in by_theta) >= 7


def _derive_and_compare(name, share, seed):
    model, x = _example(name)
    g, sup = _supernet(model, x, share)
    thetas = dict(g.root.archir_theta.items())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in thetas.values():
            p.copy_(torch.rand(3, generator=gen))
    project_thetas(g)
    decisions = derive_and_check_one_hot(g, sup, x, atol=1e-6)
    return g, decisions, model


@pytest.mark.parametrize("name", ["resnet20", "darts_cell", "mbconv"])
@pytest.mark.parametrize("share", ["cell", "full"])
def test_derive_prune_fold_equals_one_hot_supernet(name, share):
    g, decisions, model = _derive_and_compare(name, share, seed=7)
    assert {"none", "identity"} & set(decisions.values()), "random θ should change some edges"


def test_pruned_network_is_physically_smaller():
    g, decisions, model = _derive_and_compare("resnet20", "full", seed=3)
    assert "none" in decisions.values()
    slim = g.to_module()
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    assert g.total_flops() < archir.trace(model, torch.randn(2, 3, 32, 32)).total_flops()
    names = [n for n, _ in g.root.named_modules()]
    assert not any(n.startswith(("archir_mix", "archir_theta")) for n in names)
    # no identity left: no empty edge into a plain junction
    assert not [e for e in g.edges.values() if not e.ops and g.junctions[e.dst].combine is None]


def test_derive_ties_go_to_the_original():
    model, x = _example("resnet20")
    g, sup = _supernet(model, x, "full")
    with torch.no_grad():
        for p in arch_parameters(g):
            p.fill_(1.0)  # every valid choice weighs the same
    PassManager([Derive()])(g)
    assert {e.labels["decision"] for e in g.edges.values() if "decision" in e.labels} == {"same"}


def test_a_sum_never_loses_every_operand():
    model, x = _example("resnet20")
    g, sup = _supernet(model, x, "full")
    with torch.no_grad():
        for p in arch_parameters(g):
            p.copy_(torch.tensor([1.0, 0.0, 0.0]))  # none wins wherever it is valid
        # make the residual branch of the first block the better non-none operand
        g.root.archir_theta[g.edges["e2"].labels["param"]].copy_(torch.tensor([1.0, 0.2, 0.5]))
    PassManager([Derive(), Prune(), FoldIdentities()])(g)
    g.verify()
    assert g.edges["e2"].labels["decision"] == "same" and "e3" not in g.edges
    y = g.to_module().eval()(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_fold_identities_removes_identity_modules_and_trivial_arithmetic():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.skip = nn.Identity()

        def forward(self, x):
            return self.skip(self.a(x) * 1) + 0

    model = M().eval()
    g = archir.trace(model, torch.randn(2, 4))
    assert PassManager([FoldIdentities()])(g).modified
    assert [op.render() for e in g.edges.values() for op in e.ops] == ["a"]
    assert "skip" not in dict(g.root.named_modules())
    x = torch.randn(3, 4)
    assert torch.equal(g.to_module()(x), model(x))
    assert not PassManager([FoldIdentities()])(g).modified  # honest `modified`


def test_fold_identities_drops_an_idempotent_activation_of_its_own_output():
    """relu(relu(x)) = relu(x), also across junctions (what a pruned residual block leaves); a
    relu after a different activation, or after a fork's other reader, stays."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.r1, self.r2, self.r6 = nn.ReLU(), nn.ReLU(inplace=True), nn.ReLU6()

        def forward(self, x):
            h = self.r1(self.a(x))
            h = torch.relu(self.r2(h))                     # two repeats: both go
            k = self.r6(torch.nn.functional.relu6(self.b(h)))  # relu6 · ReLU6: the second goes
            return torch.relu(torch.nn.functional.leaky_relu(h)) + torch.relu(k)  # both stay

    model = M().eval()
    g = archir.trace(model, torch.randn(2, 4), granularity="block")
    before = sum(len(e.ops) for e in g.edges.values())
    assert PassManager([FoldIdentities()])(g).modified
    assert before - sum(len(e.ops) for e in g.edges.values()) == 3
    kinds = [op.render() for e in g.edges_in_order() for op in e.ops]
    assert kinds.count("r1") == 1 and "r2" not in kinds and "r6" not in kinds
    for seed in range(3):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(g.to_module()(x), model(x))
    assert not PassManager([FoldIdentities()])(g).modified


@pytest.mark.parametrize("weights", [(0.0, 0.0, 1.0), (0.1, 0.3, 0.6), (0.5, 0.0, 0.5)])
@pytest.mark.parametrize("with_identity", [True, False])
def test_weighted_sum_matches_autograd(weights, with_identity):
    """The hand-written mixer (and its CPU fast path at w = (0, 0, 1)) has autograd's gradients."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=gen, requires_grad=True)
    o = torch.randn(2, 3, 4, 4, generator=gen, requires_grad=True)
    g = torch.randn(2, 3, 4, 4, generator=gen)
    choices = ("none", "identity", "same") if with_identity else ("none", "same")
    grads = []
    for fused in (True, False):
        theta = torch.tensor(weights, requires_grad=True)
        for t in (x, o):
            t.grad = None
        if fused:
            out = EdgeMix(choices)(*((x, o) if with_identity else (o,)), theta=theta)
        else:
            mask = torch.tensor([1.0, float(with_identity), 1.0])
            w = theta / (theta * mask).sum()
            out = w[2] * o + (w[1] * x if with_identity else 0)
        out.backward(g)
        grads.append((out.detach(), theta.grad.clone(), o.grad.clone(),
                      x.grad.clone() if x.grad is not None else torch.zeros_like(x)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("has_x,convex", [(False, False), (True, False), (True, True)])
def test_weighted_sum_matches_autograd_of_its_formula(has_x, convex):
    """The fused mixer's hand-written backward against autograd of w_same·o + w_id·x."""
    from archir.passes.edge_choice import WeightedSum

    torch.manual_seed(0)
    o = torch.randn(3, 4, 5, dtype=torch.double, requires_grad=True)
    x = torch.randn(3, 4, 5, dtype=torch.double, requires_grad=True) if has_x else None
    w_id = torch.tensor(0.3, dtype=torch.double, requires_grad=True) if has_x else None
    w_same = torch.tensor(0.7 if convex else 0.6, dtype=torch.double, requires_grad=True)
    g = torch.randn(3, 4, 5, dtype=torch.double)
    got = WeightedSum.apply(o, w_same, x, w_id, convex)
    want = o * w_same + (x * w_id if has_x else 0)
    torch.testing.assert_close(got, want)
    inputs = [t for t in (o, w_same, x, w_id) if t is not None]
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_scaled_batch_norm_is_batch_norm_at_scale_one(momentum):
    """w_same folded into γ, β: bit for bit nn.BatchNorm2d at 1, running statistics included."""
    from archir.passes.mixing import scaled_batch_norm

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    twin = copy.deepcopy(bn)
    x = torch.randn(3, 4, 5, 5)
    for mode in (True, True, False):
        bn.train(mode)
        twin.train(mode)
        assert torch.equal(scaled_batch_norm(x, twin, torch.tensor(1.0)), bn(x))
        assert torch.equal(twin.running_mean, bn.running_mean) and torch.equal(twin.running_var, bn.running_var)
        assert twin.num_batches_tracked == bn.num_batches_tracked


def test_scaled_batch_norm_gradients_are_those_of_scaling_the_output():
    from archir.passes.mixing import scaled_batch_norm

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.double)
    s = torch.tensor(0.7, dtype=torch.double, requires_grad=True)
    g = torch.randn(3, 4, 5, 5, dtype=torch.double)
    params = [s, bn.weight, bn.bias]
    got = torch.autograd.grad(scaled_batch_norm(x, bn, s), params, g)
    want = torch.autograd.grad(s * bn(x), params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_fused_mixing_is_the_same_function_and_gradients(name):
    """Folding w_same into BatchNorm changes no value and no gradient."""
    model, x = _example(name)
    nontrivial_batch_norms(model)  # at γ = 1, β = 0 a wrong fold hides
    graphs = {}
    for fuse in (True, False):
        g = archir.trace(model, x)
        PassManager([EdgeChoice("full", fuse=fuse)])(g)
        graphs[fuse] = g
    mixers = graphs[True].root.archir_mix.values()
    if name == "resnet20":
        assert sum(m.folded for m in mixers) == 18
    torch.manual_seed(1)
    for g in graphs.values():  # the same θ off the initial corner in both
        for i, theta in enumerate(arch_parameters(g)):
            with torch.no_grad():
                theta.copy_(torch.tensor([0.1 + 0.01 * i, 0.2, 0.7]))
    grads, outs = {}, {}
    for fuse, g in graphs.items():
        sup = g.to_module().double().train()
        torch.manual_seed(2)  # the same dropout masks
        out = sup(x.double())
        outs[fuse] = out
        out.square().mean().backward()
        grads[fuse] = [t.grad for t in arch_parameters(g)]
    torch.testing.assert_close(outs[True], outs[False])
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b)
