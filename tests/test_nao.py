"""NAO (archir/methods/nao.py): DNAT's discrete-choice interface, the token space, the encoder-
decoder, the search loop against random search on a hidden objective, and the pipeline."""
import itertools
import random

import pytest
import torch
from torch import nn

import archir
from archir.errors import UserInputError
from archir.methods._nao_model import NAOModel, TokenSpace, normalise_scores, reconstruction_accuracy, train_nao
from model_patterns import load_example, nontrivial_batch_norms, random_like
from archir.methods.nao import nao_search, random_search

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet20():
    mod = load_example("resnet20")
    torch.manual_seed(0)
    model = mod.build_model()
    nontrivial_batch_norms(model)
    return model.eval(), torch.randn(2, 3, 32, 32)


def _derived_text(graph):
    return str(graph)


def test_dnat_set_architecture_equals_its_derived_network(resnet20):
    """θ one-hot at a random valid architecture: the supernet computes exactly what derive gives,
    and the canonical architecture derives to the same network."""
    model, x = resnet20
    s = archir.search(model, x, method="dnat", share="full")
    m = s.method
    space = TokenSpace(m.choice_space(s.graph), m.forbidden_choices(s.graph),
                       lambda a: m.canonical_architecture(s.graph, a))
    rng = random.Random(0)
    s.supernet.eval()
    for trial in range(2):
        arch = space.sample(rng)
        arch[next(iter(arch))] = "identity"  # t0: conv1 of the first block, so something is dead below
        m.set_architecture(s.graph, arch)
        slim = s.derive().eval()
        decided = {lab["param"]: lab["decision"] for lab in s.recorded_decisions.values()}
        assert decided == arch  # derive takes exactly the architecture that was set
        xi = random_like(x, trial)
        with torch.no_grad():
            torch.testing.assert_close(slim(xi), s.supernet(xi), rtol=0, atol=1e-5)
        canon = m.canonical_architecture(s.graph, arch)
        m.set_architecture(s.graph, canon)
        s2 = s.graph.copy(share_root=False)
        from archir.passes import PassManager
        PassManager(m.derive_passes())(s2)
        m.set_architecture(s.graph, arch)
        s3 = s.graph.copy(share_root=False)
        PassManager(m.derive_passes())(s3)
        s2.verify()
        assert _derived_text(s2) == _derived_text(s3)
    # a residual branch pruned (t1 none) leaves its first conv's decision (t0) irrelevant
    arch = m.original_architecture(s.graph)
    dead = {**arch, "t1": "none"}
    assert m.canonical_architecture(s.graph, {**dead, "t0": "identity"}) == m.canonical_architecture(s.graph, dead)
    assert m.canonical_architecture(s.graph, arch) == arch


def test_dnat_choice_space_and_refusals(resnet20):
    model, x = resnet20
    s = archir.search(model, x, method="dnat", share="cell")
    m = s.method
    space = m.choice_space(s.graph)
    assert set(space) == {p for p in dict(s.graph.root.archir_theta.items())}
    assert m.original_architecture(s.graph) == {d: "same" for d in space}
    forbidden = m.forbidden_choices(s.graph)
    assert forbidden and all(set(f.values()) == {"none"} and len(f) == 2 for f in forbidden)
    arch = m.original_architecture(s.graph)
    with pytest.raises(UserInputError, match="without operands"):
        m.set_architecture(s.graph, {**arch, **forbidden[0]})
    with pytest.raises(UserInputError, match="not one of its choices"):
        m.set_architecture(s.graph, {**arch, "t0": "none"})
    with pytest.raises(UserInputError, match="missing decisions"):
        m.set_architecture(s.graph, {})
    # the token space: exactly the valid combinations, none forbidden, decoded back unchanged
    tokens = TokenSpace(space, forbidden)
    valid = [dict(zip(space, c)) for c in itertools.product(*space.values())]
    valid = [a for a in valid if not any(all(a[d] == v for d, v in f.items()) for f in forbidden)]
    assert tokens.size() == len(valid) == 50
    for a in valid:
        assert tokens.decode(tokens.encode(a)) == a
    with pytest.raises(UserInputError, match="no discrete choice space"):
        archir.search(model, x, method="dso").method.choice_space(s.graph)


def test_encoder_decoder_reconstructs_its_training_architectures(resnet20):
    model, x = resnet20
    s = archir.search(model, x, method="nao", seed=0)  # DNAT, full sharing: 2.5e8 architectures
    space = s.method.tokens
    rng = random.Random(1)
    archs = [space.sample(rng) for _ in range(48)]
    tokens = torch.tensor([space.encode(a) for a in archs])
    torch.manual_seed(0)
    nao = NAOModel(space)
    scores = normalise_scores([sum(v == "same" for v in a.values()) for a in archs])
    train_nao(nao, tokens, scores, epochs=100, trade_off=0.8)
    assert reconstruction_accuracy(nao, tokens) >= 0.99
    # the encoder's states have unit norm; decoding never leaves a position's vocabulary
    assert torch.allclose(nao.encode(tokens).norm(dim=-1), torch.ones(tokens.shape[:2]), atol=1e-5)
    with torch.no_grad():
        noisy = nao.decode(nao.encode(tokens) + torch.randn(tokens.shape[0], space.length, 64))
    for row in noisy.tolist():
        assert space.valid(space.decode(row))


def _hidden_objective(seed, decisions=16):
    """A hidden score of the choices: per-choice terms plus interactions of neighbours."""
    g = random.Random(100 + seed)
    choices = {f"d{i}": ("none", "identity", "same") for i in range(decisions)}
    forbidden = [{f"d{i}": "none", f"d{i + 1}": "none"} for i in range(0, decisions, 4)]
    w = {d: {c: g.gauss(0, 1) for c in cs} for d, cs in choices.items()}
    pairs = {(f"d{i}", f"d{i + 1}"): {(a, b): 0.5 * g.gauss(0, 1) for a in choices[f"d{i}"]
                                      for b in choices[f"d{i + 1}"]} for i in range(decisions - 1)}

    def f(arch):
        return sum(w[d][c] for d, c in arch.items()) + sum(t[(arch[a], arch[b])] for (a, b), t in pairs.items())

    return TokenSpace(choices, forbidden), f


def test_nao_beats_random_search_on_a_hidden_objective():
    """Same number of evaluations (NAO's own count), seeds 0-3: NAO's best is higher on most seeds
    and on average."""
    wins, gaps = 0, []
    for seed in range(4):
        space, f = _hidden_objective(seed)
        calls = []

        def score(archs, f=f, calls=calls):
            calls.extend(archs)
            return [f(a) for a in archs]

        nao = nao_search(space, score, initial=16, rounds=4, top_k=8, nao_epochs=50, hidden=32, seed=seed)
        assert len(calls) == len(nao["history"]) <= 16 + 4 * 8
        assert all(space.valid(a) for a in calls)
        assert len({space.key(a) for a in calls}) == len(calls)  # never scores one twice
        rand = random_search(space, lambda a, f=f: [f(x) for x in a], len(calls), seed=seed)
        wins += nao["best_score"] > rand["best_score"]
        gaps.append(nao["best_score"] - rand["best_score"])
    assert wins >= 3 and sum(gaps) / len(gaps) > 0, gaps


def _tiny_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    return torch.utils.data.TensorDataset(x, y)


class _Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.c = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b(self.a(x)))
        x = torch.relu(x + self.c(x))
        return self.head(x.mean((2, 3)))


def test_transform_nao_epochs0_returns_the_original():
    torch.manual_seed(0)
    model = _Res().eval()
    x = torch.randn(2, 3, 8, 8)
    res = archir.transform(model, x, method="nao", epochs=0, progress=False)
    assert "architecture_search" not in res.report
    assert all(d["decision"] == "same" for d in res.report["decisions"])
    with torch.no_grad():
        xi = torch.randn(4, 3, 8, 8)
        torch.testing.assert_close(res.module(xi), model(xi), rtol=0, atol=1e-6)


def test_transform_nao_searches_then_derives_its_best(tmp_path):
    torch.manual_seed(0)
    res = archir.transform(_Res(), torch.randn(2, 3, 8, 8), method="nao", train_data=_tiny_data(),
                           val_data=_tiny_data(48, 1), out=tmp_path / "run", epochs=2, arch_epochs=1,
                           batch_size=16, initial=6, rounds=1, top_k=3, nao_epochs=20, progress=False,
                           onnx=False)
    log = res.report["architecture_search"]
    assert log["strategy"] == "nao" and log["evaluations"] == 9
    assert log["evaluator"]["held_out_batches"] == 1  # 10% of 96 examples held out (split)
    assert res.report["options"]["arch_update"] == "split"
    decided = {d["param"]: d["decision"] for d in res.report["decisions"] if d["param"]}
    assert decided == log["best"]
    assert log["best_score"] == max(s["score"] for s in log["scores"])
    res.graph.verify()
    assert (tmp_path / "run" / "model.py").exists()


def test_nao_options_are_checked():
    with pytest.raises(UserInputError, match="another method"):
        archir.methods.create("nao", space="nao")
    with pytest.raises(UserInputError, match="space-options"):
        archir.methods.create("nao", space_options="nonsense=1")
    m = archir.methods.create("nao", space_options="search_activations=true,form=linear")
    assert m.space.options.search_activations is True and m.space.options.form == "linear"


def test_nao_on_proxyless_choices_derives_what_it_chose():
    """The same NAO over another method's choices (kernel sizes and activations), read only
    through the discrete-choice interface."""
    torch.manual_seed(0)
    s = archir.search(_Res(), torch.randn(2, 3, 8, 8), method="nao", space="proxyless", initial=4, rounds=1,
                      top_k=2, nao_epochs=10, seed=0)
    assert s.arch_parameters() == [] and all(not p.requires_grad for p in s.method.space.arch_parameters(s.graph))
    x, y = _tiny_data().tensors
    opt = torch.optim.SGD(s.weight_parameters(), lr=0.05)
    for i in range(2):  # every training forward runs another random path
        loss = nn.functional.cross_entropy(s.supernet(x[:32]), y[:32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert s.method.training_steps == 2
    log = s.choose_architecture(val_data=[(x[64:], y[64:])], calibration_data=[(x[:32], y[:32])])
    assert log["evaluations"] == 6 and set(log["best"]) == set(s.method.choice_space(s.graph))
    s.supernet.eval()
    slim = s.derive().eval()
    with torch.no_grad():
        torch.testing.assert_close(slim(x[:8]), s.supernet(x[:8]), rtol=0, atol=1e-6)


_MODEL_PY = '''import torch
from torch import nn
class Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.c = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 2)
    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b(x))
        x = torch.relu(x + self.c(x))
        return self.head(x.mean((2, 3)))
def build_model():
    return Res()
def example_input():
    return torch.randn(2, 3, 8, 8)
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 3, 8, 8, generator=g)
    ds = torch.utils.data.TensorDataset(x, (x[:, 0].mean((1, 2)) > 0).long())
    return ds, ds
'''


def test_archir_transform_method_nao_cli(tmp_path):
    import json

    from click.testing import CliRunner

    from archir.cli import main

    model_py = tmp_path / "res.py"
    model_py.write_text(_MODEL_PY)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["transform", str(model_py), "--method", "nao", "--epochs", "2", "--arch-epochs", "1",
                                  "--batch-size", "16", "--initial", "3", "--rounds", "1", "--top-k", "2",
                                  "--nao-epochs", "10", "--no-onnx", "--quiet", "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "nao" and 3 < report["architecture_search"]["evaluations"] <= 5
    assert (out / "model.py").is_file()
    r = CliRunner().invoke(main, ["transform", str(model_py), "--method", "nao", "--space", "dso", "--epochs", "0",
                                  "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "no discrete choice space" in r.output


def test_training_forwards_draw_random_paths_and_eval_computes_the_current_one():
    torch.manual_seed(0)
    model = _Res().eval()
    s = archir.search(model, torch.randn(2, 3, 8, 8), method="nao", seed=3)
    m = s.method
    space = m.choice_space(s.graph)
    original = m.original_architecture(s.graph)

    def fixed():  # the architecture θ encodes now
        return {d: choices[int(s.graph.root.archir_theta[d][[("none", "identity", "same").index(c)
                                                             for c in choices]].argmax())]
                for d, choices in space.items()}

    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(s.supernet.eval()(x), model(x), rtol=0, atol=1e-6)  # the original
    s.supernet.train()
    drawn = set()
    for _ in range(12):
        s.supernet(x)
        drawn.add(tuple(fixed().values()))
        assert m.tokens.valid(fixed())
    assert len(drawn) > 3
    with torch.no_grad():
        s.supernet.eval()(x)
    assert fixed() == original  # eval mode computes the current architecture again
