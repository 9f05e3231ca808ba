"""DSO-NAS end to end: the built-in trainer (split data, APG-NAG, pruning) and ``archir transform
--method dso`` on a tiny residual network with generated data."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import archir
from archir.cli import main

MODEL_PY = '''
import torch
from torch import nn
import torch.nn.functional as F

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))

class TinyRes(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(8) for _ in range(4)])
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.blocks(F.relu(self.stem(x))).mean((2, 3)))

def build_model():
    return TinyRes()

def example_input():
    return torch.randn(2, 3, 8, 8)

def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    ds = torch.utils.data.TensorDataset(x, y)
    return ds, ds
'''


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny_res.py"
    path.write_text(MODEL_PY)
    namespace: dict = {}
    exec(compile(MODEL_PY, str(path), "exec"), namespace)
    return path, namespace


def test_a_short_run_zeroes_some_lambda_and_prunes_those_edges(tiny):
    _, ns = tiny
    torch.manual_seed(0)
    train, val = ns["data"]()
    res = archir.transform(ns["build_model"](), ns["example_input"](), method="dso", train_data=train,
                           val_data=val, epochs=4, arch_epochs=3, batch_size=16, gamma=0.5, warmup_epochs=0,
                           progress=False)
    r = res.report
    assert r["options"]["arch_update"] == "split" and r["options"]["arch_optimizer"] == "method"
    assert r["method_defaults"] == {"arch_update": "split", "arch_optimizer": "method"}
    final = r["arch_history"][2]["weights"]  # λ per edge after the last architecture epoch
    zeros = [e for e, w in final.items() if w["λ"] == 0.0]
    assert 0 < len(zeros) < len(final)  # some λ exactly 0, not all
    pruned = [d["edge"] for d in r["decisions"] if d["decision"] == "none"]
    assert sorted(pruned) == sorted(zeros)
    assert r["transformed"]["flops_per_example"] < r["original"]["flops_per_example"]
    assert r["transformed"]["parameters"] < r["original"]["parameters"]
    assert [h["changed_edges"] for h in r["history"]][2] == sorted(zeros)  # changed = λ at 0


def test_user_choice_beats_the_methods_defaults(tiny):
    _, ns = tiny
    train, val = ns["data"]()
    res = archir.transform(ns["build_model"](), ns["example_input"](), method="dso", train_data=train,
                           val_data=val, epochs=1, arch_epochs=1, batch_size=64, arch_update="alternate",
                           arch_optimizer="adam", gamma=20.0, progress=False)
    assert res.report["options"]["arch_update"] == "alternate" and res.report["options"]["arch_optimizer"] == "adam"
    assert res.report["method_defaults"] == {}
    # Adam then the soft threshold S_{ηγ} (η = 0.05, γ = 20: α = 1): λ reached exact zeros
    assert all(w["λ"] == 0.0 for w in res.report["arch_history"][0]["weights"].values())


def test_target_flops_search_zeroes_lambda_before_derive(tiny):
    """Through the trainer: the ramp is half of the search's λ steps, and λ reaches 0 during the
    search, so derive has nothing left to force (no ``budget`` decision)."""
    _, ns = tiny
    train, val = ns["data"]()
    res = archir.transform(ns["build_model"](), ns["example_input"](), method="dso", train_data=train,
                           val_data=val, epochs=3, arch_epochs=2, batch_size=16, target_flops=0.7,
                           progress=False)
    r = res.report
    assert r["transformed"]["flops_per_example"] <= 0.7 * r["original"]["flops_per_example"]
    assert any(w["λ"] == 0.0 for w in r["arch_history"][-1]["weights"].values())
    assert not any(d.get("budget") for d in r["decisions"])


def test_cli_transform_method_dso(tiny, tmp_path):
    path, _ = tiny
    runner = CliRunner()
    help_text = runner.invoke(main, ["transform", "--help"]).output
    for flag in ("--gamma", "--penalty", "--densify", "--target-flops", "--apg-momentum"):
        assert flag in help_text
    out = tmp_path / "out"
    r = runner.invoke(main, ["transform", str(path), "--method", "dso", "--gamma", "0.5", "--penalty", "flops",
                             "--epochs", "3", "--arch-epochs", "2", "--warmup-epochs", "1", "--batch-size", "16",
                             "--retrain", "scratch", "--quiet", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "TinyRes:" in r.output and "model.onnx" in r.output
    for f in ("model.py", "weights.pt", "model.onnx", "arch.png", "report.md", "report.json"):
        assert (out / f).is_file(), f
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "dso" and report["method_options"]["penalty"] == "flops"
    assert report["options"]["retrain"] == "scratch" and report["method_options"]["freeze_bn"]
    assert report["onnx"]["passed"]
    assert report["history"][0]["warmup"]  # weight pre-training: λ did not move in epoch 1
    assert all(w["λ"] == 1.0 for w in report["arch_history"][0]["weights"].values())
    assert "λ" in (out / "report.md").read_text()
    r = runner.invoke(main, ["inspect", str(path), "--method", "dso"])
    assert r.exit_code == 0 and "4 edges scaled by λ (inputs of sums): each could be pruned (dso)" in r.output


def test_densified_candidates_that_survive_are_reported_as_added(tiny):
    _, ns = tiny
    train, val = ns["data"]()
    res = archir.transform(ns["build_model"](), ns["example_input"](), method="dso", train_data=train,
                           val_data=val, epochs=3, arch_epochs=2, batch_size=16, gamma=0.05, densify="identity",
                           progress=False)
    r = res.report
    original = {d["edge"] for d in r["decisions"] if d["decision"] != "added"}
    final = r["arch_history"][1]["weights"]
    survivors = {e for e, w in final.items() if e not in original and w["λ"] != 0.0}
    added = {d["edge"]: d for d in r["decisions"] if d["decision"] == "added"}
    assert set(added) == survivors and len(final) > len(original & set(final))
    for d in added.values():  # an identity candidate keeps its λ as a constant multiply
        assert d["ops"][-1].startswith("mul(") and d["from"] and d["to"]
