"""``archir.transform`` and ``archir transform`` end to end, on tiny budgets."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

import archir
from archir.cli import main
from model_patterns import load_example

TINY_MODEL = textwrap.dedent('''
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(out)) + x)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.blocks = nn.Sequential(Block(8), Block(8))
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))

    def build_model():
        torch.manual_seed(0)
        return Tiny()

    def example_input():
        return torch.randn(2, 3, 32, 32)
''')

FAST = dict(epochs=2, arch_epochs=1, batch_size=64, subset=256, progress=False, arch_lr=0.2)


@pytest.fixture()
def tiny(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY_MODEL)
    from archir.model_file import load_model_file

    return path, load_model_file(path)


def test_epochs_zero_computes_the_original(tmp_path):
    ex = load_example("resnet20")
    torch.manual_seed(0)
    model = ex.build_model()
    res = archir.transform(model, ex.example_input(), epochs=0, onnx=False)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(res.module.eval()(x), model.eval()(x))
    assert res.report["transformed"]["parameters"] == res.report["original"]["parameters"]
    assert all(d["decision"] == "same" for d in res.report["decisions"])


def test_user_model_untouched_and_weights_deterministic(tiny):
    path, spec = tiny
    before = {k: v.clone() for k, v in spec.model.state_dict().items()}
    a = archir.transform(spec.model, spec.example_inputs, **FAST)
    b = archir.transform(spec.model, spec.example_inputs, **FAST)
    assert all(torch.equal(before[k], v) for k, v in spec.model.state_dict().items())
    user = {t.untyped_storage().data_ptr() for t in spec.model.state_dict().values()}
    assert not user & {t.untyped_storage().data_ptr() for t in a.module.state_dict().values()}
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [d["decision"] for d in a.report["decisions"]] == [d["decision"] for d in b.report["decisions"]]
    assert a.report["history"] == b.report["history"] or all(
        x["val_metric"] == y["val_metric"] for x, y in zip(a.report["history"], b.report["history"]))


@pytest.mark.parametrize("mode", ["alternate", "split", "joint"])
def test_arch_update_modes_run(tiny, mode):
    _, spec = tiny
    res = archir.transform(spec.model, spec.example_inputs, arch_update=mode, share="full", **FAST)
    hist = res.report["arch_history"]
    assert hist[0]["stage"] == "arch" and hist[0]["weights"]
    assert res.report["transformed"]["val_accuracy"] is not None


def test_from_weights_starts_where_the_user_model_is(tiny, tmp_path):
    _, spec = tiny
    trained = spec.model
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    from archir.model_file import load_model_file

    fresh = load_model_file(tiny[0]).model
    res = archir.transform(fresh, spec.example_inputs, epochs=0, onnx=False, from_weights=str(tmp_path / "w.pt"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(res.module.eval()(x), trained.eval()(x))
    assert not torch.equal(fresh.eval()(x), trained.eval()(x))  # the weights went into a copy
    bad = tmp_path / "bad.pt"
    torch.save({"nope": torch.zeros(1)}, bad)
    with pytest.raises(archir.UserInputError, match="does not fit the model"):
        archir.transform(fresh, spec.example_inputs, epochs=0, from_weights=str(bad))


def test_cli_transform_writes_every_output(tiny, tmp_path):
    path, _ = tiny
    out = tmp_path / "out"
    args = ["transform", str(path), "--out", str(out), "--epochs", "2", "--arch-epochs", "1", "--subset", "256",
            "--batch-size", "64", "--arch-lr", "0.2", "--quiet", "--share", "full"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    for name in ("model.py", "weights.pt", "model.onnx", "report.json", "report.md", "graph.svg", "arch.png",
                 "checkpoint.pt"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["method_options"]["share"] == "full" and report["seed"] == 0
    assert report["versions"]["torch"] == torch.__version__
    assert report["time_seconds"]["total"] > 0 and report["onnx"]["passed"]
    assert "edges changed" in res.output
    # the emitted module runs in a fresh interpreter with nothing but torch
    code = (f"import importlib.util, torch; s = importlib.util.spec_from_file_location('m', {str(out / 'model.py')!r}); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); net = m.build_model(); "
            f"net.load_state_dict(torch.load({str(out / 'weights.pt')!r}, weights_only=True)); "
            "print(net.eval()(torch.zeros(1, 3, 32, 32)).shape)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and "torch.Size([1, 10])" in proc.stdout, proc.stderr
    # a non-empty output directory is refused without --force, and nothing is lost
    before = (out / "report.json").read_bytes()
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "not empty" in res.output
    assert (out / "report.json").read_bytes() == before
    res = CliRunner().invoke(main, args + ["--force", "--no-onnx", "--epochs", "0"])
    assert res.exit_code == 0, res.output


def test_cli_transform_errors(tiny, tmp_path):
    path, _ = tiny
    res = CliRunner().invoke(main, ["transform", str(path), "--out", str(tmp_path / "o"), "--data", "cifar10",
                                    "--data-dir", str(tmp_path / "nowhere"), "--quiet"])
    assert res.exit_code == 2 and "archir: error:" in res.output and "Traceback" not in res.output
    assert not any((tmp_path / "o").glob("*.pt"))
    res = CliRunner().invoke(main, ["transform", str(path), "--epochs", "-1", "--out", str(tmp_path / "p")])
    assert res.exit_code == 2


def test_model_file_data_function(tmp_path):
    path = tmp_path / "withdata.py"
    path.write_text(TINY_MODEL + textwrap.dedent('''
        def data():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(64, 3, 32, 32, generator=g)
            y = torch.randint(0, 10, (64,), generator=g)
            ds = torch.utils.data.TensorDataset(x, y)
            return ds, ds
    '''))
    res = CliRunner().invoke(main, ["transform", str(path), "--out", str(tmp_path / "o"), "--epochs", "1",
                                    "--arch-epochs", "1", "--batch-size", "32", "--quiet", "--no-onnx"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["history"][0]["steps"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_transform_on_cuda(tiny):
    _, spec = tiny
    res = archir.transform(spec.model, spec.example_inputs, device="cuda", **FAST)
    assert res.report["device"].startswith("cuda")
    x = torch.randn(2, 3, 32, 32)
    assert res.module(x).shape == (2, 10)  # returned on the CPU, ready to save


def test_cli_same_seed_same_weights(tmp_path):
    """The model file's own random initialisation follows --seed (no manual_seed in build_model)."""
    path = tmp_path / "unseeded.py"
    path.write_text(TINY_MODEL.replace("        torch.manual_seed(0)\n", ""))
    weights = []
    for run in ("a", "b"):
        torch.manual_seed(1000 + len(weights))  # whatever state the process is in
        out = tmp_path / run
        res = CliRunner().invoke(main, ["transform", str(path), "--out", str(out), "--epochs", "1",
                                        "--arch-epochs", "1", "--subset", "128", "--batch-size", "64",
                                        "--quiet", "--no-onnx", "--seed", "3"])
        assert res.exit_code == 0, res.output
        weights.append(torch.load(out / "weights.pt", weights_only=True))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
