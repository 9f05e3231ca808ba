"""DNAT's search space as the paper defines it, and θ's two forms (normalised, the paper's Eq. (1))."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import archir
from archir import methods
from archir.passes.base import PassManager
from archir.passes.derive import Derive
from archir.passes.edge_choice import (WHY_ACTIVATION, WHY_PARAMETRISED, WHY_SHORTCUT, EdgeChoice,
                                       arch_parameters, choice_reason, edge_weights, valid_choices)
from model_patterns import derive_and_check_one_hot, load_example, nontrivial_batch_norms, random_like


def _example(name):
    ex = load_example(name)
    torch.manual_seed(0)
    return ex.build_model().eval(), ex.example_input()


def _is_conv(graph, op):
    return op.kind == "call_module" and isinstance(graph.root.get_submodule(op.target), nn.Conv2d)


def _is_relu(op):
    return op.name in ("relu", "relu_")


def _post_sum_relus(graph):
    return [e for e in graph.edges.values() if e.ops and all(_is_relu(op) for op in e.ops)
            and graph.junctions[e.src].combine is not None and graph.junctions[e.src].combine.kind == "sum"]


def _into_sum(graph, e):
    dst = graph.junctions[e.dst]
    return dst.combine is not None and dst.combine.kind == "sum" and len(graph.in_edges(dst.id)) >= 2


def test_default_space_is_conv_edges_and_shortcuts_into_sums():
    model, x = _example("resnet20")
    g = archir.trace(model, x)
    relus = _post_sum_relus(g)
    assert len(relus) == 8  # one after each residual sum but the last (it opens the head's edge)
    original = {e.id: (list(e.ops), valid_choices(g, e)) for e in g.edges.values()}
    PassManager([EdgeChoice("full")])(g)
    chosen = {e.id: e.labels for e in g.edges.values() if "choices" in e.labels}
    for r in relus:
        assert r.id not in chosen, "a post-sum ReLU is outside the paper's space"
    convs = shortcuts = 0
    for eid, (ops, valid) in original.items():
        if len(valid) < 2:
            assert eid not in chosen
            continue
        if any(_is_conv(g, op) for op in ops):
            convs += 1
            assert chosen[eid]["why"] == WHY_PARAMETRISED, eid
        elif not ops and _into_sum(g, g.edges[eid]):
            shortcuts += 1
            assert chosen[eid]["why"] == WHY_SHORTCUT, eid
        else:
            assert eid not in chosen, (eid, ops)
    assert (convs, shortcuts) == (18, 7) and len(chosen) == 25
    # no activation-only edge anywhere in the default space
    for eid in chosen:
        assert not all(_is_relu(op) for op in original[eid][0]) or not original[eid][0]


def test_search_activations_brings_the_post_sum_relus_back():
    model, x = _example("resnet20")
    g = archir.trace(model, x)
    relus = [e.id for e in _post_sum_relus(g)]
    assert all(choice_reason(g, g.edges[r]) is None for r in relus)
    assert all(choice_reason(g, g.edges[r], search_activations=True) == WHY_ACTIVATION for r in relus)
    PassManager([EdgeChoice("full", search_activations=True)])(g)
    for r in relus:
        assert g.edges[r].labels["choices"] == "identity,same" and g.edges[r].labels["why"] == WHY_ACTIVATION


def test_choice_reason_on_small_patterns():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.w = nn.Parameter(torch.randn(4, 4, 3, 3) * 0.1)
            self.gamma = nn.Parameter(torch.ones(4, 1, 1))
            self.norm = nn.GroupNorm(2, 4)
            self.drop = nn.Dropout(0.0)
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            a = self.bn(self.conv(x))
            b = F.conv2d(a, self.w, padding=1) + self.drop(a)
            c = self.norm(b) + b
            d = torch.sigmoid(c) + F.max_pool2d(c, 3, 1, 1) + c * self.gamma
            return self.fc(d.mean((2, 3)))

    torch.manual_seed(0)
    g = archir.trace(Net().eval(), torch.randn(2, 4, 6, 6), granularity="block")
    got = {e.render_ops().split("(")[0]: (choice_reason(g, e), choice_reason(g, e, search_activations=True))
           for e in g.edges.values() if e.ops}
    P, S, A, O = WHY_PARAMETRISED, WHY_SHORTCUT, WHY_ACTIVATION, "other operations (--search-activations)"
    assert got == {
        "conv · bn": (P, P),            # nn.Conv2d and the BatchNorm after it
        "conv2d": (P, P),               # F.conv2d reading a weight
        "mean": (P, P),                 # ... · fc: nn.Linear
        "drop": (S, S),                 # dropout into a sum
        "max_pool2d": (S, S),           # a parameter-free path into a sum
        "norm": (None, A),              # normalisation only, into a sum: fixed by default
        "sigmoid": (None, A),           # activation only, into a sum: fixed by default
        "mul": (None, O),               # a layer scale reads a parameter: not a shortcut
    }
    direct = [e for e in g.edges.values() if not e.ops]
    assert direct and all(choice_reason(g, e) == WHY_SHORTCUT for e in direct)


@pytest.mark.parametrize("name", ["resnet20", "darts_cell", "mobilenetv2"])
@pytest.mark.parametrize("share", ["cell", "full"])
@pytest.mark.parametrize("form", ["normalised", "linear"])
def test_parity_at_initialisation_is_exact_in_both_forms(name, share, form):
    model, x = _example(name)
    g = archir.trace(model, x)
    PassManager([EdgeChoice(share, form=form)])(g)
    assert arch_parameters(g)
    sup = g.to_module().eval()
    with torch.no_grad():
        for seed in (0, 1):
            xi = random_like(x, seed)
            assert torch.equal(model(xi), sup(xi))


@pytest.mark.parametrize("form", ["normalised", "linear"])
def test_search_activations_parity(form):
    model, x = _example("resnet20")
    s = archir.search(model, x, share="cell", search_activations=True, form=form)
    with torch.no_grad():
        assert torch.equal(s.supernet.eval()(x), model(x))


def _sgd_steps(form, lr=5.0, steps=3):
    model, x = _example("resnet20")
    gen = torch.Generator().manual_seed(0)
    xb, yb = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    s = archir.search(model, x, share="full", form=form)
    opt = torch.optim.SGD(s.arch_parameters(), lr=lr)
    s.supernet.train()
    for _ in range(steps):
        loss = F.cross_entropy(s.supernet(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()  # the method's after_arch_step runs from the optimiser hook
    return s


def test_linear_theta_may_go_negative_normalised_may_not():
    lin = _sgd_steps("linear")
    assert min(float(t.detach().min()) for t in lin.arch_parameters()) < 0
    # raw θ is what is reported, none's θ never moves (∂o_e/∂θ_none = 0)
    assert all(float(t.detach()[0]) == 0.0 for t in lin.arch_parameters())
    weights = lin.arch_weights()
    assert any(w < 0 for ws in weights.values() for w in ws.values())
    norm = _sgd_steps("normalised")
    assert min(float(t.detach().min()) for t in norm.arch_parameters()) >= 0
    assert all(abs(sum(ws.values()) - 1) < 1e-5 for ws in norm.arch_weights().values())


def _first_residual_branch(g):
    """The first edge into a sum that may be none, identity or same (a conv·bn residual branch)."""
    return next(e for e in g.edges_in_order() if e.labels.get("choices") == "none,identity,same")


@pytest.mark.parametrize("form", ["linear", "normalised"])
def test_derive_picks_none_when_identity_and_same_are_negative(form):
    model, x = _example("resnet20")
    g = archir.trace(model, x)
    PassManager([EdgeChoice("full", form=form)])(g)
    e = _first_residual_branch(g)
    with torch.no_grad():
        g.root.archir_theta[e.labels["param"]].copy_(torch.tensor([0.0, -0.3, -0.1]))
    assert edge_weights(g)[e.id] == (pytest.approx({"none": 0.0, "identity": -0.3, "same": -0.1})
                                     if form == "linear" else {"none": 0.0, "identity": 0.0, "same": 0.0})
    PassManager([Derive()])(g)
    # Eq. (1): none (θ stays 0) beats two negative weights; normalised, the clamped weights tie at 0
    assert e.labels["decision"] == ("none" if form == "linear" else "same")
    others = {x.labels["decision"] for x in g.edges.values() if "decision" in x.labels and x is not e}
    assert others == {"same"}


@pytest.mark.parametrize("name", ["resnet20", "darts_cell", "mobilenetv2"])
@pytest.mark.parametrize("share", ["cell", "full"])
def test_linear_derive_equals_one_hot_supernet(name, share):
    model, x = _example(name)
    g = archir.trace(model, x)
    PassManager([EdgeChoice(share, form="linear")])(g)
    sup = g.to_module().eval()
    thetas = dict(g.root.archir_theta.items())
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in thetas.values():
            p.copy_(torch.rand(3, generator=gen) * 2 - 1)  # raw θ, negatives included
    decisions = derive_and_check_one_hot(g, sup, x, atol=1e-5)
    assert {"none", "identity"} & set(decisions.values()), "random θ should change some edges"


def test_linear_form_folds_only_a_closing_batch_norm_and_keeps_function_and_gradients():
    """Under Eq. (1) w_same may be negative: w·relu(bn(x)) ≠ relu(w·bn(x)), so only edges that end
    in their BatchNorm fold, and fused and unfused agree for negative θ."""
    model, x = _example("resnet20")
    nontrivial_batch_norms(model)
    graphs = {}
    for fuse in (True, False):
        g = archir.trace(model, x)
        PassManager([EdgeChoice("full", fuse=fuse, form="linear")])(g)
        graphs[fuse] = g
    g = graphs[True]
    folded = [e for e in g.edges.values() if "choices" in e.labels and g.root.archir_mix[e.id].folded]
    assert len(folded) == 11  # the 9 conv·bn branches into sums and 2 projection shortcuts
    for e in folded:
        last = e.ops[0].args[-1][-1]  # the "same" candidate's last op
        assert isinstance(g.root.get_submodule(last.target), nn.BatchNorm2d)
    for g in graphs.values():
        for i, theta in enumerate(arch_parameters(g)):
            with torch.no_grad():
                theta.copy_(torch.tensor([0.0, 0.3 - 0.05 * i, -0.4 - 0.01 * i]))
    outs, grads = {}, {}
    for fuse, g in graphs.items():
        sup = g.to_module().double().train()
        out = sup(x.double())
        out.square().mean().backward()
        outs[fuse], grads[fuse] = out, [t.grad for t in arch_parameters(g)]
    torch.testing.assert_close(outs[True], outs[False])
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b)


def test_options_and_candidates_line():
    model, x = _example("resnet20")
    g = archir.trace(model, x)
    line = methods.create("dnat").candidates(g)
    assert line == "25 searchable edges (18 parametrised, 7 shortcuts into sums): 16 could become identity, " \
                   "18 could become none", line
    wide = methods.create("dnat", search_activations=True).candidates(g)
    assert wide.startswith("33 searchable edges (18 parametrised, 7 shortcuts into sums, 8 activation/normalisation)")
    assert methods.create("dnat", form="linear").options.form == "linear"
    with pytest.raises(archir.UserInputError, match="--form must be one of"):
        methods.create("dnat", form="softmax")
    s = archir.search(model, x, form="linear")
    assert "form=linear" in s.method.describe()
