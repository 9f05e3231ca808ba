"""DSO-NAS (archir/methods/dso.py, passes/edge_scale.py, passes/densify.py): λ on every input of a
sum, APG-NAG with exact zeros, pruning and folding that keep the function, the method through
archir.search, the trainer and the CLI."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import archir
from archir.methods.dso import APGNAG, soft_threshold
from archir.passes import Densify, DeriveScale, EdgeScale, FoldScale, PassManager, Prune
from archir.passes.edge_scale import budget_pruning, edge_lambdas, kept_flops, lambda_of, scale_op, scaled_edges


pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    def __init__(self, c, tail="bn"):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.tail = tail

    def forward(self, x):
        h = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        if self.tail == "relu":
            h = F.relu(h)            # λ folds through the ReLU when λ ≥ 0
        elif self.tail == "sigmoid":
            h = torch.sigmoid(h)     # not affine: λ stays a multiply
        return F.relu(x + h)


class MLPRes(nn.Module):
    """A residual branch ending in a linear layer (λ folds into its weight and bias)."""

    def __init__(self, c):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        return x + self.fc(x)


class TinyRes(nn.Module):
    def __init__(self, tails=("bn", "bn", "bn"), c=8, classes=4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(c, t) for t in tails])
        self.mlp = MLPRes(c)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.mlp(self.blocks(F.relu(self.stem(x))).mean((2, 3))))


def _model(**kw):
    torch.manual_seed(0)
    return TinyRes(**kw)


# -- the search space ---------------------------------------------------------------------------

@pytest.mark.parametrize("share", ["full", "cell"])
def test_parity_at_initialisation_bit_for_bit(share):
    model, x = _model(), torch.randn(4, 3, 8, 8)
    s = archir.search(model, x, method="dso", share=share)
    assert len(scaled_edges(s.graph)) == 4  # three residual branches and the MLP branch, no shortcut
    assert all(v == 1.0 for v in edge_lambdas(s.graph).values())
    assert len(s.arch_parameters()) == (4 if share == "full" else 2)  # cell: the 3 blocks share one λ
    s.graph.verify()
    model.eval(), s.supernet.eval()
    assert torch.equal(s.supernet(x), model(x))
    model.train(), s.supernet.train()  # batch statistics, and the gradients of every weight
    out_m, out_s = model(x), s.supernet(x)
    assert torch.equal(out_s, out_m)
    out_m.square().sum().backward()
    out_s.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    frozen = {n for n, p in s.supernet.named_parameters() if not p.requires_grad}
    assert frozen == {f"blocks.{i}.b2.weight" for i in range(3)}  # freeze_bn: the BatchNorm before each λ
    for n, p in s.supernet.named_parameters():
        if n in grads and n not in frozen:
            assert torch.equal(p.grad, grads[n]), n


def test_freeze_bn_fixes_the_scale_before_lambda_during_the_search_only():
    model, x = _model(), torch.randn(4, 3, 8, 8)
    s = archir.search(model, x, method="dso", gamma=0.0)
    frozen = {n for n, p in s.supernet.named_parameters() if not p.requires_grad}
    # the last BatchNorm of each residual branch (λ·γ·x̂ = (cλ)·(γ/c)·x̂); the MLP branch has none
    assert frozen == {f"blocks.{i}.b2.weight" for i in range(3)}
    before = {n: p.detach().clone() for n, p in s.supernet.named_parameters() if n in frozen}
    opt = torch.optim.SGD(s.weight_parameters(), lr=0.5)
    s.supernet(x).square().sum().backward()
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in s.supernet.named_parameters() if n in frozen)
    derived = s.derive()
    assert all(p.requires_grad for p in derived.parameters())  # the network stage trains them again
    unfrozen = archir.search(_model(), x, method="dso", freeze_bn=False)
    assert all(p.requires_grad for p in unfrozen.supernet.parameters())


def test_shortcuts_option_scales_the_identity_shortcuts():
    s = archir.search(_model(), torch.randn(2, 3, 8, 8), method="dso", shortcuts=True)
    assert len(scaled_edges(s.graph)) == 8
    whys = {e.labels["why"] for e in scaled_edges(s.graph)}
    assert whys == {"input of a sum (Eq. 2)", "shortcut into a sum (--shortcuts)"}


@pytest.mark.parametrize("mode", ["identity", "conv1x1"])
def test_densify_keeps_the_function_at_initialisation(mode):
    model, x = _model().eval(), torch.randn(4, 3, 8, 8)
    s = archir.search(model, x, method="dso", densify=mode)
    dense = [e for e in s.graph.edges.values() if e.labels.get("dense")]
    # the 8x8x8 stage: the stem's output, then per block its middle, sum and output junctions; the
    # k-th block's sum gets an edge from each of the 3k − 1 earlier ones but its two operands
    assert len(dense) == 0 + 3 + 6
    assert all(edge_lambdas(s.graph)[e.id] == 0.0 for e in dense)
    assert {e.labels["dense_kind"] for e in dense} == {mode}
    assert torch.equal(s.supernet.eval()(x), model(x))
    s.graph.verify()


# -- APG-NAG ------------------------------------------------------------------------------------

def test_apg_nag_one_and_two_steps_by_hand():
    lam = nn.Parameter(torch.tensor([1.0, 0.05, -0.3, 0.02], dtype=torch.float64))
    opt = APGNAG([lam], lr=0.1, gamma=0.5, momentum=0.9)
    g1 = torch.tensor([0.5, 0.1, -0.2, 0.0], dtype=torch.float64)
    lam.grad = g1.clone()
    opt.step()
    # z = λ − ηg = (0.95, 0.04, −0.28, 0.02); ηγ = 0.05; S = (0.9, 0, −0.23, 0)
    # v = S − λ + 0 = (−0.1, −0.05, 0.07, −0.02); λ = S + μv = (0.81, −0.045, −0.167, −0.018)
    v1 = torch.tensor([-0.1, -0.05, 0.07, -0.02], dtype=torch.float64)
    assert torch.allclose(lam.detach(), torch.tensor([0.81, -0.045, -0.167, -0.018], dtype=torch.float64))
    assert torch.allclose(opt.state[lam]["v"], v1)
    lam.grad = torch.tensor([0.1, 0.0, 0.0, 0.0], dtype=torch.float64)
    prev = lam.detach().clone()
    opt.step()
    z = prev - 0.1 * lam.grad
    s = torch.sign(z) * torch.clamp_min(z.abs() - 0.05, 0)  # (0.75, 0, −0.117, 0)
    v2 = s - prev + 0.9 * v1
    assert torch.allclose(lam.detach(), s + 0.9 * v2)
    # coordinates 2 and 4 were thresholded twice in a row: exactly zero, not 1e-8, and v too
    assert lam[1].item() == 0.0 and lam[3].item() == 0.0
    assert opt.state[lam]["v"][1].item() == 0.0 and opt.state[lam]["v"][3].item() == 0.0


def test_soft_threshold():
    z = torch.tensor([-2.0, -0.5, 0.0, 0.3, 0.75, 3.0])
    assert torch.equal(soft_threshold(z, 0.5), torch.tensor([-1.5, 0.0, 0.0, 0.0, 0.25, 2.5]))
    assert soft_threshold(z, 0.5)[1].item() == 0.0


def _apg_solve(grad_fn, x0, lr, gamma, steps=3000, momentum=0.9):
    x = nn.Parameter(x0.clone())
    opt = APGNAG([x], lr=lr, gamma=gamma, momentum=momentum)
    for _ in range(steps):
        x.grad = grad_fn(x.detach())
        opt.step()
    return x.detach()


def test_apg_nag_converges_to_the_lasso_solution_with_exact_zeros():
    # separable: min ½ Σ d_i (x_i − c_i)² + γ‖x‖₁ has x*_i = S_{γ/d_i}(c_i)
    d = torch.tensor([1.0, 2.0, 0.5, 1.0, 4.0], dtype=torch.float64)
    c = torch.tensor([1.0, 0.05, -0.8, -0.05, 0.3], dtype=torch.float64)
    gamma = 0.2
    expected = torch.sign(c) * torch.clamp_min(c.abs() - gamma / d, 0)  # (0.8, 0, −0.4, 0, 0.25)
    x = _apg_solve(lambda x: d * (x - c), torch.ones(5, dtype=torch.float64), lr=0.05, gamma=gamma)
    assert torch.allclose(x, expected, atol=1e-9)
    assert [v == 0.0 for v in x.tolist()] == [False, True, False, True, False]
    # a coupled lasso, min ½‖Ax − b‖² + γ‖x‖₁: checked by its optimality (KKT) conditions
    g = torch.Generator().manual_seed(0)
    A = torch.randn(20, 8, generator=g, dtype=torch.float64)
    b = A @ torch.tensor([1.5, 0, 0, -2.0, 0, 0, 0.7, 0], dtype=torch.float64) \
        + 0.1 * torch.randn(20, generator=g, dtype=torch.float64)
    gamma = 2.0
    lr = 1.0 / torch.linalg.matrix_norm(A, 2).item() ** 2
    x = _apg_solve(lambda x: A.T @ (A @ x - b), torch.zeros(8, dtype=torch.float64), lr=lr, gamma=gamma, steps=5000)
    grad = A.T @ (A @ x - b)
    nz = x != 0
    assert torch.allclose(grad[nz], -gamma * torch.sign(x[nz]), atol=1e-8)
    assert bool((grad[~nz].abs() <= gamma + 1e-8).all())
    assert 0 < int((~nz).sum()) < 8  # some coordinates exactly zero, not all
    assert x[0] > 1 and x[3] < -1


def test_any_other_optimiser_gets_the_soft_threshold_after_its_step():
    model, x = _model(), torch.randn(4, 3, 8, 8)
    s = archir.search(model, x, method="dso", gamma=50.0)
    opt = torch.optim.Adam(s.arch_parameters(), lr=0.05)  # ηγ = 2.5 > |λ|: every λ to exactly 0
    s.supernet(x).square().mean().backward()
    opt.step()
    assert all(v == 0.0 for v in edge_lambdas(s.graph).values())
    s2 = archir.search(model, x, method="dso", gamma=0.0)
    assert isinstance(s2.arch_optimizer(lr=0.1), APGNAG)
    assert isinstance(archir.search(model, x, method="dnat").arch_optimizer(lr=0.1), torch.optim.Adam)


# -- pruning and folding ------------------------------------------------------------------------

def _set_lambdas(s, values):
    with torch.no_grad():
        for e, v in zip(scaled_edges(s.graph), values):
            lambda_of(s.graph, scale_op(e)).fill_(v)


def test_prune_and_fold_are_exact_including_a_non_affine_last_operation():
    model = _model(tails=("bn", "relu", "sigmoid", "bn"))
    x = torch.randn(6, 3, 8, 8)
    s = archir.search(model, x, method="dso")
    edges = [e.id for e in scaled_edges(s.graph)]
    assert len(edges) == 5
    with torch.no_grad():  # trained-looking BatchNorm statistics
        for m in s.supernet.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    # block 0: pruned; block 1 (bn · relu): 0.37 through the ReLU; block 2 (sigmoid): kept as a
    # multiply; block 3 (bn): −0.6 into the BatchNorm; the MLP branch (linear): 1.7 into the linear
    _set_lambdas(s, [0.0, 0.37, 0.8, -0.6, 1.7])
    s.supernet.eval()
    before = s.supernet(x)
    slim = s.derive().eval()
    after = slim(x)
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-5)
    d = s.recorded_decisions
    assert [d[e]["decision"] for e in edges] == ["none", "same", "same", "same", "same"]
    # the folds, read from the derived graph (the derive passes again, on a copy)
    graph = s.graph.copy(share_root=False)
    PassManager(s.method.derive_passes())(graph)
    folds = {eid: graph.edges[eid].labels.get("fold") for eid in edges[1:]}
    assert folds[edges[1]] == "folded into blocks.1.b2"
    assert folds[edges[2]].startswith("kept as x * 0.8: the last operation before λ, sigmoid")
    assert folds[edges[3]] == "folded into blocks.3.b2"
    assert folds[edges[4]] == "folded into mlp.fc"
    assert edges[0] not in graph.edges  # pruned, with its dead conv1 chain
    assert "blocks.0.c1" not in dict(graph.root.named_modules())
    assert not hasattr(graph.root, "archir_lambda")  # no λ left: folded or constants
    consts = [op for e in graph.edges.values() for op in e.ops if op.target is operator.mul]
    assert len(consts) == 1 and consts[0].args[1] == pytest.approx(0.8)
    assert graph.total_params() < s.original.total_params()
    # train mode too (batch statistics): the fold into BatchNorm's γ and β holds there as well
    s.supernet.train(), slim.train()
    assert torch.allclose(slim(x), s.supernet(x), atol=1e-5, rtol=1e-5)


def test_constant_multiply_is_bit_exact():
    t = torch.randn(1000)
    lam = torch.tensor(0.3711)
    assert torch.equal(t * lam, t * float(lam))


def test_negative_lambda_through_relu_stays_a_multiply():
    model = _model(tails=("relu", "bn", "bn"))
    x = torch.randn(4, 3, 8, 8)
    s = archir.search(model, x, method="dso")
    _set_lambdas(s, [-0.5, 1.0, 1.0, 1.0])
    s.supernet.eval()
    graph = s.graph.copy(share_root=False)
    PassManager(s.method.derive_passes())(graph)
    e0 = scaled_edges(s.graph)[0].id
    assert graph.edges[e0].labels["fold"].startswith("kept as x * -0.5: λ = -0.5 < 0 does not commute with relu")
    assert all(graph.edges[e.id].labels["fold"] == "λ = 1: dropped" for e in scaled_edges(s.graph)[1:])
    assert torch.allclose(graph.to_module().eval()(x), s.supernet(x), atol=1e-6)


def test_a_sum_whose_operands_are_all_zero_keeps_one_exactly():
    model = _model()
    x = torch.randn(4, 3, 8, 8)
    s = archir.search(model, x, method="dso", shortcuts=True)
    # block 0's branch and shortcut both 0: its sum computes 0 (then relu): keep the cheaper operand
    _set_lambdas(s, [0.0, 0.0] + [1.0] * 6)
    s.supernet.eval()
    before = s.supernet(x)
    slim = s.derive().eval()
    assert torch.equal(slim(x), before) or torch.allclose(slim(x), before, atol=1e-6)
    kept = [d for d in s.recorded_decisions.values() if d["decision"] == "zero"]
    assert len(kept) == 1 and kept[0]["why"] == "shortcut into a sum (--shortcuts)"


def test_without_scaled_shortcuts_a_fully_pruned_block_becomes_the_identity():
    model = _model()
    x = torch.randn(4, 3, 8, 8)
    s = archir.search(model, x, method="dso")
    _set_lambdas(s, [0.0, 0.0, 0.0, 1.0])
    s.supernet.eval()
    slim = s.derive().eval()
    assert torch.allclose(slim(x), s.supernet(x), atol=1e-6)
    assert not any(isinstance(m, nn.Conv2d) and m.in_channels == 8 for m in slim.modules())


def test_passes_verify_after_each_one_and_report_modified():
    model = _model()
    x = torch.randn(2, 3, 8, 8)
    graph = archir.trace(model, x)
    seen = []
    PassManager([Densify("conv1x1"), EdgeScale("full")], instruments=[lambda p, g: seen.append(p.pass_name)])(graph)
    lam = edge_lambdas(graph)
    with torch.no_grad():
        for i, e in enumerate(scaled_edges(graph)):
            lambda_of(graph, scale_op(e)).fill_(0.0 if i % 2 else 0.5)
    result = PassManager([DeriveScale(), Prune(), FoldScale()],
                         instruments=[lambda p, g: seen.append(p.pass_name)])(graph)
    assert result.modified and seen == ["Densify", "EdgeScale", "DeriveScale", "Prune", "FoldScale"]
    assert len(lam) > 4
    assert not EdgeScale().run(archir.trace(nn.Sequential(nn.Linear(3, 3)), torch.randn(2, 3))).modified


# -- penalties and budget -----------------------------------------------------------------------

def test_adaptive_flops_and_mac_penalties():
    model, x = _model(), torch.randn(2, 3, 8, 8)
    s = archir.search(model, x, method="dso", penalty="flops")
    params = s.arch_parameters()
    assert all(v == pytest.approx(1.0) for v in s.method.penalty_scales(s.graph).values())  # all kept
    with torch.no_grad():
        params[0].zero_()  # block 0 pruned: FLOPs^t of its block = 0, so its γ is 0 (Eq. 9)
    scales = s.method.penalty_scales(s.graph)
    assert scales[id(params[0])] == 0.0 and scales[id(params[1])] == pytest.approx(1.0)
    s = archir.search(model, x, method="dso", penalty="mac")
    scales = s.method.penalty_scales(s.graph)
    values = [scales[id(p)] for p in s.arch_parameters()]
    assert max(values) == pytest.approx(1.0) and all(0 < v <= 1 for v in values)
    assert values[3] < values[0]  # the MLP branch (a linear on 8 values) costs less than a conv block


def test_target_flops_budget_is_met_at_derive():
    model, x = _model(), torch.randn(4, 3, 8, 8)
    s = archir.search(model, x, method="dso", target_flops=0.6)
    _set_lambdas(s, [0.9, 0.1, 0.5, 0.2])
    slim = s.derive()
    derived_flops = archir.trace(slim, x).total_flops()
    assert derived_flops <= 0.6 * s.original.total_flops()
    budget = [d for d in s.recorded_decisions.values() if d.get("budget")]
    assert budget and all(d["decision"] == "none" for d in budget)
    assert s.recorded_decisions[scaled_edges(s.graph)[0].id]["decision"] == "same"  # largest λ kept


def test_budget_pruning_takes_the_smallest_lambda_over_its_penalty_weight():
    """At equal λ the edge whose λ the penalty weighs more goes first (|λ_e| / s_e: the steps a
    proximal step at that weight needs to reach 0); weights that reverse the λ order reverse it."""
    model, x = _model(), torch.randn(4, 3, 8, 8)
    s = archir.search(model, x, method="dso")
    ids = [e.id for e in scaled_edges(s.graph)][:3]  # the three conv blocks: equal FLOPs
    budget = kept_flops(s.graph, {ids[0]}) + 1  # one conv block must go
    lams = {eid: 1.0 for eid in edge_lambdas(s.graph)}
    assert budget_pruning(s.graph, lams, budget, {ids[1]: 2.0}) == {ids[1]}
    lams[ids[0]] = 0.5
    assert budget_pruning(s.graph, lams, budget) == {ids[0]}
    assert budget_pruning(s.graph, lams, budget, {ids[2]: 4.0}) == {ids[2]}  # 1/4 < 0.5/1


class TrunkAndSide(nn.Module):
    """An image trunk of two residual blocks, summed with a cheap side input's branch."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.side = nn.Linear(4, 8)

    def forward(self, image, vec):
        return self.blocks(F.relu(self.stem(image))).mean((2, 3)) + self.side(vec)


def test_budget_pruning_does_not_take_along_edges_the_search_ranks_higher():
    """The trunk's λ is the smallest, but pruning it would also remove both blocks, whose λ are
    larger, and leave almost nothing: a block goes instead, and the network lands near the budget."""
    model, x = TrunkAndSide(), (torch.randn(2, 3, 8, 8), torch.randn(2, 4))
    s = archir.search(model, x, method="dso")
    lams = edge_lambdas(s.graph)
    trunk = next(e.id for e in scaled_edges(s.graph) if "mean" in " ".join(op.name for op in s.graph.edges[e.id].ops))
    block = [e.id for e in scaled_edges(s.graph) if e.id != trunk and s.graph.edges[e.id].dst != s.graph.edges[trunk].dst]
    side = next(e.id for e in scaled_edges(s.graph) if e.id not in (trunk, *block))
    lams.update({trunk: 0.3, block[0]: 0.9, block[1]: 0.5})
    total = kept_flops(s.graph)
    assert budget_pruning(s.graph, lams, 0.7 * total) == {block[1]}
    assert kept_flops(s.graph, {block[1]}) > 0.4 * total
    lams[side] = 0.1  # ranks first but frees almost nothing: not needed once a block has gone
    assert budget_pruning(s.graph, lams, 0.7 * total) == {block[1]}
    lams.update({side: 1.0, block[0]: 0.2, block[1]: 0.25})  # blocks below the trunk: they go first,
    # then the trunk may go too; the blocks, dead with it, need no pruning of their own
    assert budget_pruning(s.graph, lams, 0.05 * total) == {trunk}


def test_target_flops_controller_reaches_the_budget_by_the_end_of_its_ramp():
    """With no loss gradient, the budget penalty brings the owed λ (smallest |λ| first) to 0 right
    after step R, leaves the others at γ, and keeps the pruned ones at 0 from then on."""
    model, x = _model(), torch.randn(4, 3, 8, 8)
    s = archir.search(model, x, method="dso", target_flops=0.6, target_steps=6, gamma=1e-3)
    _set_lambdas(s, [0.9, 0.3, 0.5, 0.8])
    params = s.arch_parameters()
    opt = s.arch_optimizer(lr=0.1)
    fractions = []
    for _ in range(9):  # G = 0: only the proximal step moves λ
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        fractions.append(s.method.flops_fraction(s.graph))
    assert fractions[0] > 0.6 and fractions[-1] <= 0.6
    # zeroed from R on: exact zeros take APG-NAG two thresholded steps, so by step R + 2 (index R + 1)
    assert next(i for i, f in enumerate(fractions) if f <= 0.6) == 7
    assert all(f > 0.6 for f in fractions[:6])  # and not before the ramp ends: the push grows gradually
    lams = [float(p.detach()) for p in params]
    assert lams[1] == lams[2] == 0.0 and min(lams[0], lams[3]) > 0.79  # the owed went; the others kept γ
    assert set(s.method.budget_scales) == {"e7", "e11"}  # after R the pruned stay pruned (S_∞)
    state = s.method.state_dict()
    assert state["lambda_steps"] == 9


@pytest.mark.parametrize("mode", ["identity", "conv1x1"])
def test_densified_edges_that_survive_are_derived_exactly(mode):
    model, x = _model(), torch.randn(4, 3, 8, 8)
    s = archir.search(model, x, method="dso", densify=mode)
    dense = [e for e in scaled_edges(s.graph) if e.labels.get("dense")]
    with torch.no_grad():  # two candidates switched on, one main branch pruned
        lambda_of(s.graph, scale_op(dense[0])).fill_(0.5)
        lambda_of(s.graph, scale_op(dense[-1])).fill_(-0.25)
        lambda_of(s.graph, scale_op(scaled_edges(s.graph)[0])).fill_(0.0)
    s.supernet.eval()
    before = s.supernet(x)
    graph = s.graph.copy(share_root=False)
    PassManager(s.method.derive_passes())(graph)
    assert torch.allclose(graph.to_module().eval()(x), before, atol=1e-5)
    folds = {graph.edges[e.id].labels["fold"] for e in (dense[0], dense[-1])}
    if mode == "identity":
        assert all(f.startswith("kept as x * ") and f.endswith("no affine operation on the edge") for f in folds)
    else:
        assert all(f.startswith("folded into archir_dense.") for f in folds)
    assert sum(1 for e in graph.edges.values() if e.labels.get("dense")) == 2  # the zero ones are gone


class Down(nn.Module):
    """A downsampling block: conv branch and a 1×1 stride-2 projection shortcut into one sum."""

    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * c)
        self.c2, self.b2 = nn.Conv2d(2 * c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c)
        self.proj = nn.Sequential(nn.Conv2d(c, 2 * c, 1, stride=2, bias=False), nn.BatchNorm2d(2 * c))

    def forward(self, x):
        return F.relu(self.proj(x) + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


def test_a_projection_shortcut_is_the_block_input_path_and_stays_unscaled():
    model, x = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Down(4)).eval(), torch.randn(2, 3, 8, 8)
    s = archir.search(model, x, method="dso")
    (e,) = scaled_edges(s.graph)
    assert e.labels["why"] == "input of a sum (Eq. 2)" and "c2" in e.render_ops()
    _set_lambdas(s, [0.0])  # the branch pruned: the block becomes its projection
    s.supernet.eval()
    slim = s.derive().eval()
    assert torch.allclose(slim(x), s.supernet(x), atol=1e-6)
    assert len(scaled_edges(archir.search(model, x, method="dso", shortcuts=True).graph)) == 2
