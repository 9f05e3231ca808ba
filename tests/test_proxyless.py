"""ProxylessNAS (archir/methods/proxyless.py, passes/candidate_ops.py): candidate kernels and
activations behind binary gates, warm start, the gate gradient, scope, derive and the pipeline."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from archir.passes import candidate_ops
from archir.passes.candidate_ops import gate_ops, plan_units
from click.testing import CliRunner
from model_patterns import load_example, nontrivial_batch_norms
from torch import nn

import archir
from archir.cli import main
from archir.errors import UserInputError

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    def __init__(self, c, stride=1):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, 2 * c if stride == 2 else c, 3, stride, 1, bias=False), \
            nn.BatchNorm2d(2 * c if stride == 2 else c)
        out = 2 * c if stride == 2 else c
        self.c2, self.b2 = nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out)
        self.short = nn.Conv2d(c, out, 1, stride, bias=False) if stride == 2 else nn.Identity()

    def forward(self, x):
        return F.relu(self.short(x) + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class TinyRes(nn.Module):
    """Three stages (8, 16, 32 channels at 8x8, 4x4, 2x2)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8), Block(8, 2), Block(16, 2))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


def _model(seed=0):
    torch.manual_seed(seed)
    m = TinyRes()
    nontrivial_batch_norms(m)
    return m


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_no_training_is_the_original_bit_for_bit_and_derives_to_it():
    m = _model()
    s = archir.search(m, X, method="proxyless")
    s.graph.verify()
    space = s.method.choice_space(s.graph)
    assert space["e0_kernel"] == ("k5", "k7", "k3") and space["e0_act"][-1] == "relu"  # the original last
    assert s.method.original_architecture(s.graph) == {k: v[-1] for k, v in space.items()}
    m.eval()
    s.supernet.eval()
    assert torch.equal(s.supernet(X), m(X))  # eval: argmax, ties to the original
    slim = s.derive().eval()
    assert torch.equal(slim(X), m(X))
    assert not any(d["changed"] for d in s.recorded_decisions.values())
    assert not hasattr(slim, "archir_alpha") and not hasattr(slim, "archir_gates")


def test_larger_kernels_with_the_original_activation_compute_the_original():
    m = _model()
    s = archir.search(m, X, method="proxyless", kernels="3,5,7")
    arch = {k: ("k7" if k.endswith("_kernel") else v[-1]) for k, v in s.method.choice_space(s.graph).items()}
    s.method.set_architecture(s.graph, arch)
    ref = m.eval()(X)
    s.supernet.eval()
    torch.testing.assert_close(s.supernet(X), ref, rtol=1e-5, atol=1e-5)
    slim = s.derive().eval()
    torch.testing.assert_close(slim(X), ref, rtol=1e-5, atol=1e-5)
    kernels = {mod.kernel_size for mod in slim.modules() if isinstance(mod, nn.Conv2d) and mod.kernel_size != (1, 1)}
    assert kernels == {(7, 7)}
    # in training mode too (batch statistics; every gate draws the one choice left after softmax)
    m.train()
    s.supernet.train()
    torch.testing.assert_close(s.supernet(X), m(X), rtol=1e-4, atol=1e-4)


def test_set_architecture_fixes_the_supernet_and_the_derived_network():
    s = archir.search(_model(), X, method="proxyless", combine="product")
    space = s.method.choice_space(s.graph)
    assert space["e1"][0] == "k5-leaky_relu" and space["e1"][-1] == "k3-relu"
    arch = {k: v[0] for k, v in space.items()}
    s.method.set_architecture(s.graph, arch)
    s.supernet.eval()
    slim = s.derive().eval()
    torch.testing.assert_close(slim(X), s.supernet(X), rtol=0, atol=1e-6)
    assert {d["decision"] for d in s.recorded_decisions.values()} <= {v[0] for v in space.values()}
    s.supernet.train()
    torch.manual_seed(0)  # every gate draws exactly the set choice: train mode is deterministic here
    a, b = s.supernet(X), s.supernet(X)
    assert torch.equal(a, b)
    with pytest.raises(UserInputError, match="not one of"):
        s.method.set_architecture(s.graph, {**arch, "e1": "k9-relu"})
    with pytest.raises(UserInputError, match="missing"):
        s.method.set_architecture(s.graph, {"e1": "k3-relu"})


@pytest.mark.parametrize("lead, kept", [(0.01, True), (0.05, False)])
def test_derive_keeps_the_original_unless_a_candidate_leads_by_the_margin(lead, kept):
    """After a short search α is near uniform: the original stays unless a candidate's probability
    beats it by more than derive_margin (0.02)."""
    s = archir.search(_model(), X, method="proxyless", combine="product")
    space = s.method.choice_space(s.graph)
    with torch.no_grad():
        for p in s.arch_parameters():
            p.zero_()
        alpha = s.arch_parameters()[0]
        n = alpha.numel()  # p_0 − p_last = lead: α_0 = log((1/n + lead) / (1/n)) ≈ lead·n
        alpha[0] = float(torch.log(torch.tensor(1 + lead * n)))
    first = next(iter(space))
    s.derive()
    decision = s.recorded_decisions[first]["decision"]
    assert decision == (space[first][-1] if kept else space[first][0])


def _one_unit_mix(combine="product", gate_paths=1):
    s = archir.search(_model(), X, method="proxyless", combine=combine, gate_paths=gate_paths)
    _, _, mix = gate_ops(s.graph)[1]
    return s, mix


@pytest.mark.parametrize("combine", ["product", "separate"])
def test_alpha_gradient_is_proxylessnas_estimate(combine):
    """∂L/∂α_i = Σ_j ⟨∂L/∂y, o_j⟩ p_j (δ_ij − p_i), with o_j every candidate on the same input (with
    separate decisions: each factor's candidates with the other factor at its drawn choice)."""
    s, mix = _one_unit_mix(combine)
    alphas = [s.graph.root.archir_alpha[p] for p in mix.params]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for a in alphas:
            a.copy_(torch.randn(a.shape, generator=g))
    mix.train()
    x = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    w = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    y = mix(x, **{f"a{i}": a for i, a in enumerate(alphas)})
    (y * w).sum().backward(inputs=alphas)
    with torch.no_grad():
        outs = [mix._evaluate(i, x) for i in range(len(mix.paths))]
    drawn = next(i for i, o in enumerate(outs) if torch.equal(y, o))  # only a drawn path ran
    idx = [drawn] if len(mix.factors) == 1 else [drawn // mix.factors[1], drawn % mix.factors[1]]
    for f, a in enumerate(alphas):
        paths = [mix.ravel(idx[:f] + [j] + idx[f + 1:]) for j in range(mix.factors[f])]
        p = torch.softmax(a.detach(), 0)
        dg = torch.stack([(w * outs[i]).sum() for i in paths])
        torch.testing.assert_close(a.grad, p * (dg - (p * dg).sum()), rtol=1e-4, atol=1e-6)


def test_a_weight_backward_never_evaluates_the_other_candidates(monkeypatch):
    s, _ = _one_unit_mix(combine="separate")
    calls = []
    real = candidate_ops.CandidateMix._evaluate
    monkeypatch.setattr(candidate_ops.CandidateMix, "_evaluate", lambda self, i, x: calls.append(i) or real(self, i, x))
    s.supernet.train()
    y = torch.tensor([0, 1, 2, 3])
    F.cross_entropy(s.supernet(X), y).backward(inputs=s.weight_parameters())
    assert calls == [] and all(p.grad is None for p in s.arch_parameters())
    F.cross_entropy(s.supernet(X), y).backward(inputs=s.arch_parameters())
    assert calls and all(p.grad is not None for p in s.arch_parameters())


def test_two_paths_move_only_the_drawn_pair_and_keep_the_others_probabilities():
    s, mix = _one_unit_mix(gate_paths=2)
    alpha = s.graph.root.archir_alpha[mix.params[0]]
    opt = torch.optim.SGD(s.arch_parameters(), lr=1.0)  # SGD: no momentum moves the others
    s.supernet.train()
    torch.manual_seed(0)
    before = torch.softmax(alpha.detach(), 0).clone()
    F.cross_entropy(s.supernet(X), torch.tensor([0, 1, 2, 3])).backward(inputs=s.arch_parameters())
    pair = mix.pairs[0][0]
    nonzero = alpha.grad.nonzero().flatten().tolist()
    assert set(nonzero) <= set(pair) and len(nonzero) == 2
    opt.step()  # the method's rescale runs from the optimiser hook
    assert not mix.pairs
    after = torch.softmax(alpha.detach(), 0)
    others = [i for i in range(len(after)) if i not in pair]
    torch.testing.assert_close(after[others], before[others], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(after[pair], before[pair])


def test_scope_covers_the_deepest_stages():
    g = archir.trace(_model().eval(), X)
    full = plan_units(g, scope="f")
    assert max(u.stage for u in full) == 2 and full[0].stages == 3
    for scope, n in (("s", 1), ("m", 2), ("l", 3)):
        units = plan_units(g, scope=scope)
        assert {u.stage for u in units} == set(range(3 - n, 3))
    # the stage of a block is that of its output: the downsampling block's convs are in the next stage
    by_edge = {u.edge: u.stage for u in full}
    stride2 = next(e.id for e in g.edges.values() if e.ops and e.ops[0].target == "blocks.1.c1")
    assert by_edge[stride2] == 1
    r = CliRunner().invoke(main, ["inspect", str(load_example.__globals__["EXAMPLES"] / "resnet20.py"),
                                  "--method", "proxyless"])
    assert r.exit_code == 0 and "19 gated convolutions in 3 stage(s) (scope f)" in r.output


@pytest.mark.parametrize("delta, frozen", [(1.0, True), (0.0, False)])
def test_stop_rule_freezes_alpha_once_converged(delta, frozen):
    s = archir.search(_model(), X, method="proxyless", scope="s", stop_window=2, stop_delta=delta)
    opt = s.arch_optimizer(lr=0.05)
    s.supernet.train()
    history = []
    for step in range(6):
        opt.zero_grad()
        F.cross_entropy(s.supernet(X), torch.tensor([0, 1, 2, 3])).backward(inputs=s.arch_parameters())
        opt.step()
        history.append([p.detach().clone() for p in s.arch_parameters()])
    # checks after steps 2 and 4: with δ = 1 the second check freezes α (lr 0), with δ = 0 never
    assert s.method.stopped_at == (4 if frozen else None)
    assert (opt.param_groups[0]["lr"] == 0.0) is frozen
    same = all(torch.equal(a, b) for a, b in zip(history[3], history[5]))
    assert same is frozen


@pytest.mark.parametrize("bad, match", [({"kernels": "4"}, "odd"), ({"activations": "relu,swoosh"}, "swoosh"),
                                        ({"scope": "x"}, "scope"), ({"gate_paths": 3}, "gate")])
def test_bad_options_are_one_clear_error(bad, match):
    with pytest.raises(UserInputError, match=match):
        archir.search(_model(), X, method="proxyless", **bad)


def test_mobilenetv2_depthwise_and_relu6():
    m = load_example("mobilenetv2").build_model()
    nontrivial_batch_norms(m)
    x = torch.randn(2, 3, 32, 32)
    s = archir.search(m, x, method="proxyless", scope="s", kernels="3,5")
    units = gate_ops(s.graph)
    assert units
    space = s.method.choice_space(s.graph)
    assert all(v[-1] == "relu6" for k, v in space.items() if k.endswith("_act"))
    s.supernet.eval()
    m.eval()
    assert torch.equal(s.supernet(x), m(x))
    arch = {k: ("k5" if k.endswith("_kernel") else v[-1]) for k, v in space.items()}
    s.method.set_architecture(s.graph, arch)
    slim = s.derive().eval()
    torch.testing.assert_close(slim(x), m(x), rtol=1e-4, atol=1e-4)
    dw = [mod for mod in slim.modules() if isinstance(mod, nn.Conv2d) and mod.groups > 1]
    assert dw and {mod.kernel_size for mod in dw} >= {(5, 5)}  # depthwise (groups kept) with the new kernel


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d (as in tests/test_zoo_patterns.py): functional batch_norm + an activation."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return self.act(x)


class TimmLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), BatchNormAct(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), BatchNormAct(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.bn2(self.conv2(self.bn(self.conv(x)))).mean((2, 3)))


def _check_model(m, x, **options):
    m.eval()  # traced in eval mode: a functional batch_norm's training flag is a traced constant
    s = archir.search(m, x, method="proxyless", **options)
    assert gate_ops(s.graph)
    s.supernet.eval()
    assert torch.equal(s.supernet(x), m(x))
    space = s.method.choice_space(s.graph)
    # the largest kernel (zero-padded: exact; a smaller one would be a crop) with the original activation
    arch = {k: (max(v, key=lambda c: int(c[1:])) if k.endswith("_kernel") else v[-1]) for k, v in space.items()}
    s.method.set_architecture(s.graph, arch)
    torch.testing.assert_close(s.derive().eval()(x), m(x), rtol=1e-4, atol=1e-4)
    s.supernet.train()
    F.cross_entropy(s.supernet(x), torch.zeros(len(x), dtype=torch.long)).backward()
    return s


def test_timm_batchnormact_pattern_keeps_its_own_statistics_per_kernel():
    torch.manual_seed(0)
    m = TimmLike()
    nontrivial_batch_norms(m)
    s = _check_model(m, torch.randn(2, 3, 8, 8))
    cands = s.graph.root.archir_cand
    norms = [k for k in cands if k.endswith("_norm")]
    assert len(norms) == 4  # each new kernel has its own copy of the statistics, not the original's
    for k in norms:
        stats = dict(cands[k].named_buffers())
        assert len(stats) == 2 and all(t.data_ptr() != s.graph.root.bn.running_mean.data_ptr()
                                       for t in stats.values())


@pytest.mark.parametrize("name", ["resnet10t", "mobilenetv3_small_050"])
def test_a_timm_model(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    _check_model(timm.create_model(name, pretrained=False, num_classes=3), torch.randn(2, 3, 64, 64), scope="s")


def test_latency_loss_is_expected_latency_measured_once():
    s = archir.search(_model(), X, method="proxyless", latency_weight=0.5, scope="s")
    loss = s.extra_loss()
    assert loss is not None and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in s.arch_parameters())
    cached = [mix.latency_ms for _, _, mix in gate_ops(s.graph)]
    s.extra_loss()
    assert [mix.latency_ms for _, _, mix in gate_ops(s.graph)] == cached  # measured once
    # E[lat] under uniform α is the mean latency of each unit's paths
    expected = 0.5 * sum(sum(c) / len(c) for c in cached)
    assert abs(loss.item() - expected) < 1e-4 * max(expected, 1)
    assert archir.search(_model(), X, method="proxyless").extra_loss() is None


def test_latency_measured_with_onnx_runtime():
    s = archir.search(_model(), X, method="proxyless", latency_weight=1.0, latency_target="onnx", scope="s",
                      kernels="3,5", activations="relu,mish")
    loss = s.extra_loss()
    mixes = [mix for _, _, mix in gate_ops(s.graph)]
    assert loss.item() > 0 and all(len(m.latency_ms) == len(m.paths) and min(m.latency_ms) > 0 for m in mixes)


def test_emitted_module_and_onnx_have_the_chosen_kernel_and_activation(tmp_path):
    m = _model()
    s = archir.search(m, X, method="proxyless", scope="s")
    arch = {k: ("k5" if k.endswith("_kernel") else "mish") for k in s.method.choice_space(s.graph)}
    s.method.set_architecture(s.graph, arch)
    s.supernet.eval()
    files = s.emit(tmp_path, onnx=True)
    source = Path(files["model.py"]).read_text()
    assert "kernel_size=(5, 5)" in source and "mish" in source
    spec = importlib.util.spec_from_file_location("_proxyless_emitted", files["model.py"])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.testing.assert_close(mod.load_model().eval()(X), s.supernet(X), rtol=0, atol=1e-6)
    import onnx

    ops = {n.op_type for n in onnx.load(files["model.onnx"]).graph.node}
    assert "Mish" in ops or "Softplus" in ops  # the chosen activation, exported


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    ds = torch.utils.data.TensorDataset(x, y)
    return ds, ds


def test_transform_with_the_papers_defaults_and_the_cli(tmp_path):
    ds, _ = _data()
    res = archir.transform(_model(), X, method="proxyless", train_data=ds, val_data=ds, epochs=3, arch_epochs=2,
                           warmup_epochs=0, batch_size=16, arch_lr=0.05, scope="m", progress=False)
    r = res.report
    assert r["method_defaults"]["nesterov"] is True and r["options"]["nesterov"] is True
    assert r["options"]["arch_update"] == "split" and r["options"]["weight_decay"] == 4e-5
    first, last = r["arch_history"][0]["weights"], r["arch_history"][1]["weights"]
    assert set(first) == set(r["initial_weights"]) and first != r["initial_weights"]  # α moved (softmax logged)
    assert all(abs(sum(v for c, v in w.items() if c.startswith("k")) - 1) < 1e-5 for w in last.values())
    assert [h["searchable_edges"] for h in r["history"][:2]] == [len(first)] * 2
    # CLI with no architecture epoch: derive at the start keeps the original, then one network epoch
    model_py = tmp_path / "tiny.py"
    here = str(Path(__file__).parent)
    model_py.write_text(f"import sys\nsys.path.insert(0, {here!r})\n"
                        "from test_proxyless import _model as build_model, _data as data\n"
                        "import torch\ndef example_input():\n    return torch.randn(2, 3, 8, 8)\n")
    out = tmp_path / "cli"
    run = CliRunner().invoke(main, ["transform", str(model_py), "--method", "proxyless", "--epochs", "1",
                                    "--arch-epochs", "0", "--kernels", "3,5", "--gate-paths", "2", "--batch-size",
                                    "32", "--no-onnx", "--quiet", "--out", str(out)])
    assert run.exit_code == 0, run.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "proxyless" and report["method_options"]["gate_paths"] == 2
    assert report["transformed"]["parameters"] == report["original"]["parameters"]
    searched = [d for d in report["decisions"] if d["param"]]
    assert searched and all(d["decision"].split(",")[0] == "k3" for d in searched)
