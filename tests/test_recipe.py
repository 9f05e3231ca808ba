"""``--recipe``, the weight warm-up and the per-epoch edge changes, through ``archir.transform`` and
``archir transform`` on a tiny residual model and tiny data (a few steps on the CPU)."""
from __future__ import annotations

import json
import textwrap

import pytest
from click.testing import CliRunner

import archir
from archir.cli import main, transform_command
from archir.errors import UserInputError
from archir.pipeline import RECIPES, TransformOptions, apply_recipe

MODEL = textwrap.dedent('''
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            h = self.stem(x)
            h = F.relu(self.bn1(self.conv1(h))) + h
            h = F.relu(self.bn2(self.conv2(h))) + h
            return self.fc(h.mean((2, 3)))

    def build_model():
        torch.manual_seed(0)
        return Tiny()

    def example_input():
        return torch.randn(2, 3, 8, 8)

    def data():
        g = torch.Generator().manual_seed(0)
        patterns = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(7))
        y = torch.randint(0, 4, (96,), generator=g)
        x = torch.randn(96, 3, 8, 8, generator=g) + 0.5 * patterns[y]
        ds = torch.utils.data.TensorDataset(x, y)
        return torch.utils.data.Subset(ds, range(64)), torch.utils.data.Subset(ds, range(64, 96))
''')


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "tiny.py"
    path.write_text(MODEL)
    from archir.model_file import load_model_file

    spec = load_model_file(path)
    train, val = spec.data()
    return path, spec, train, val


def run(tiny, **options):
    _, spec, train, val = tiny
    base = dict(train_data=train, val_data=val, batch_size=16, progress=False, onnx=False)
    return archir.transform(spec.model, spec.example_inputs, **{**base, **options})


def leading(weights: dict) -> str:
    order = list(weights)
    return max(order, key=lambda c: (weights[c], order.index(c)))


# --------------------------------------------------------------------------------------------


def test_changed_edges_per_architecture_epoch(tiny):
    records = []
    res = run(tiny, epochs=3, arch_epochs=2, arch_lr=1.0, share="full", on_epoch=records.append)
    report = res.report
    searchable = len(report["initial_weights"])
    assert searchable > 0
    history, arch_history = report["history"], report["arch_history"]
    assert [h["stage"] for h in history] == ["arch", "arch", "net"]
    for h, a in zip(history[:2], arch_history):
        expected = sorted(e for e, w in a["weights"].items() if leading(w) != "same")
        assert h["changed_edges"] == expected and h["searchable_edges"] == searchable
    assert history[2]["changed_edges"] is None and history[2]["searchable_edges"] is None
    assert any(h["changed_edges"] for h in history[:2])  # a large θ learning rate moves some edges
    whys = {e["edge"]: e["why"] for e in report["decisions"]}
    assert {whys[e] for e in report["initial_weights"]} <= {"parametrised: conv/linear (+ norm)",
                                                          "shortcut into a sum"}
    assert all(whys[e] is None for e in whys if e not in report["initial_weights"])
    line = records[0].summary(3)
    assert line.endswith(f"changed {len(history[0]['changed_edges'])}/{searchable}")


def test_warmup_epochs_keep_the_architecture_weights(tiny):
    res = run(tiny, epochs=3, arch_epochs=2, warmup_epochs=1, arch_lr=1.0, share="full")
    report = res.report
    h, arch = report["history"], report["arch_history"]
    assert [(r["stage"], r["warmup"], r["arch_stepped"]) for r in h] == [
        ("arch", True, False), ("arch", False, True), ("net", False, False)]
    assert arch[0]["weights"] == report["initial_weights"]  # θ did not move in the warm-up epoch
    assert arch[1]["weights"] != report["initial_weights"]
    assert h[0]["changed_edges"] == []  # the untrained decisions are all the original operations
    assert report["effective"]["warmup_epochs"] == 1 and report["options"]["warmup_epochs"] == 1


def test_default_warmup_is_one_epoch_when_the_stage_has_two(tiny):
    from archir.pipeline import effective_warmup

    res = run(tiny, epochs=3, arch_epochs=2, arch_lr=1.0, share="full")
    h = res.report["history"]
    assert [(r["warmup"], r["arch_stepped"]) for r in h] == [(True, False), (False, True), (False, False)]
    assert res.report["effective"]["warmup_epochs"] == 1 and res.report["options"]["warmup_epochs"] is None
    first, second = res.report["arch_history"][:2]
    assert first["weights"] == res.report["initial_weights"] != second["weights"]  # θ moves after the warm-up
    assert effective_warmup(TransformOptions(epochs=3, arch_epochs=1)) == 0  # a one-epoch stage searches
    assert effective_warmup(TransformOptions(epochs=1, arch_epochs=5)) == 0  # the stage is cut to one epoch
    assert effective_warmup(TransformOptions(arch_epochs=5, warmup_epochs=3)) == 3


def test_warmup_longer_than_the_architecture_stage_is_refused(tiny):
    _, spec, _, _ = tiny
    with pytest.raises(UserInputError, match=r"--warmup-epochs \(3\) must be at most --arch-epochs \(2\)"):
        archir.transform(spec.model, spec.example_inputs, epochs=0, arch_epochs=2, warmup_epochs=3,
                         progress=False, onnx=False)
    with pytest.raises(UserInputError, match="--warmup-epochs"):
        archir.transform(spec.model, spec.example_inputs, epochs=0, warmup_epochs=-1, progress=False)


def test_recipe_fills_what_was_not_given(tiny):
    res = run(tiny, recipe="dnat-cifar10", epochs=1, batch_size=96)
    report = res.report
    opts = report["options"]
    assert opts["recipe"] == "dnat-cifar10"
    assert (opts["lr"], opts["cutout"], opts["momentum"], opts["weight_decay"]) == (0.025, 16, 0.9, 3e-4)
    assert opts["epochs"] == 1 and opts["arch_epochs"] == 300 and report["effective"]["arch_epochs"] == 1
    assert report["history"][0]["lr"] == 0.025  # what the trainer used
    assert report["recipe"]["name"] == "dnat-cifar10"
    assert set(report["recipe"]["explicit"]) == {"epochs", "batch_size"}
    assert "lr" in report["recipe"]["applied"] and "epochs" not in report["recipe"]["applied"]
    # an option given explicitly wins, even when it equals the dataclass default (lr 0.1)
    assert TransformOptions.lr == 0.1
    explicit = run(tiny, recipe="dnat-cifar10", epochs=1, lr=0.1, batch_size=96).report
    assert explicit["options"]["lr"] == 0.1 and explicit["history"][0]["lr"] == 0.1
    assert explicit["options"]["cutout"] == 16
    assert run(tiny, epochs=0).report["recipe"] is None


def test_apply_recipe_rule():
    options, applied = apply_recipe({"recipe": "dnat-cifar10", "lr": 0.1, "epochs": 1})
    assert options == {**RECIPES["dnat-cifar10"], "recipe": "dnat-cifar10", "lr": 0.1, "epochs": 1}
    assert "lr" not in applied and "epochs" not in applied and applied["cutout"] == 16
    assert apply_recipe({"lr": 0.2}) == ({"lr": 0.2}, {})
    assert apply_recipe({"recipe": None, "lr": 0.2}) == ({"lr": 0.2}, {})
    with pytest.raises(UserInputError, match="--recipe must be one of dnat-cifar10"):
        apply_recipe({"recipe": "darts"})
    assert set(RECIPES["dnat-cifar10"]) <= set(TransformOptions.__dataclass_fields__)


def test_cli_flags_and_explicit_flag_wins(tiny, tmp_path):
    flags = {opt for p in transform_command().params for opt in p.opts}
    assert {"--recipe", "--warmup-epochs", "--cutout"} <= flags
    path = tiny[0]
    out = tmp_path / "o"
    res = CliRunner().invoke(main, ["transform", str(path), "--out", str(out), "--recipe", "dnat-cifar10",
                                    "--epochs", "1", "--lr", "0.1", "--quiet", "--no-onnx"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["lr"] == 0.1 and report["options"]["cutout"] == 16
    assert report["options"]["batch_size"] == 96 and report["history"][0]["steps"] == 1
    assert sorted(report["recipe"]["explicit"]) == ["epochs", "lr"]
    md = (out / "report.md").read_text()
    assert "Recipe `dnat-cifar10`" in md and "| changed |" in md
    res = CliRunner().invoke(main, ["transform", str(path), "--out", str(tmp_path / "p"), "--epochs", "0",
                                    "--arch-epochs", "1", "--warmup-epochs", "2", "--quiet", "--no-onnx"])
    assert res.exit_code == 2 and "--warmup-epochs (2) must be at most --arch-epochs (1)" in res.output
