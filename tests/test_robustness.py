"""A new user's mistakes and faults, tried on purpose: every one is caught before training with one
clear line and exit code 2 (never "a bug in archir"), and leaves every file as it was; outputs are
replaced as one unit; ``archir export`` never deletes a verified model; CIFAR pickles run no code."""
from __future__ import annotations

import collections
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from archir.cli import main
from archir.data import load_dataset
from archir.data.datasets import DataError
from archir.data.sources import read_data_pickle
from archir.output_dir import staging_dir

from model_patterns import tiny_model_file

pytestmark = pytest.mark.usefixtures("one_thread")

_RAISE = "raise ValueError('no data on this machine')"
_RAISE_LINE = tiny_model_file(data_prelude=_RAISE).splitlines().index(f"    {_RAISE}") + 1


def _model(root: Path, name: str, outputs=4, channels=3, labels="torch.arange(32) % 4", raise_=False) -> Path:
    text = tiny_model_file(outputs, channels, labels=labels,
                           data_prelude=_RAISE if raise_ else "pass")
    path = root / f"{name}.py"
    path.write_text(text)
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A folder with model files and a finished run in ``good`` (model.onnx included)."""
    root = tmp_path_factory.mktemp("robust")
    _model(root, "tiny")
    _model(root, "few_outputs", outputs=3, labels="torch.arange(32) % 5")
    _model(root, "five_channels", channels=5)
    _model(root, "data_raises", raise_=True)
    _model(root, "one_class", labels="torch.zeros(32, dtype=torch.long)")
    torch.save([1, 2, 3], root / "list.pt")
    (root / "a_file").write_text("not a folder")
    res = run("transform", root / "tiny.py", "--out", root / "good", "--epochs", "1", "--batch-size", "16", "--quiet")
    assert res.exit_code == 0, res.output
    return root


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


GOOD = ["--out", "{root}/good", "--force", "--epochs", "1", "--batch-size", "16", "--quiet"]

# one row a case: command (``{root}`` is the folder above), exit code, a fragment of the one error line
CASES = [
    ("lr nan", ["transform", "{root}/tiny.py", *GOOD, "--lr", "nan"], 2, "--lr must be a finite number"),
    ("lr inf", ["transform", "{root}/tiny.py", *GOOD, "--lr", "inf"], 2, "--lr must be a finite number"),
    ("lr negative", ["transform", "{root}/tiny.py", *GOOD, "--lr", "-1"], 2, "--lr must be >= 0"),
    ("arch-lr nan", ["transform", "{root}/tiny.py", *GOOD, "--arch-lr", "nan"], 2, "--arch-lr must be a finite"),
    ("cuda without a GPU", ["transform", "{root}/tiny.py", *GOOD, "--device", "cuda"], 2,
     "--device cuda: CUDA is not available"),
    ("arch epochs beyond epochs", ["transform", "{root}/tiny.py", *GOOD, "--arch-epochs", "5", "--epochs", "2"], 2,
     "--arch-epochs (5) must be at most --epochs (2)"),
    ("more classes than outputs", ["transform", "{root}/few_outputs.py", *GOOD], 2,
     "out of range for a model with 3 outputs"),
    ("input size the model cannot take", ["transform", "{root}/five_channels.py", *GOOD], 2,
     "the model cannot take the batch's inputs (f32[16,5,8,8])"),
    ("from-weights holding a list", ["transform", "{root}/tiny.py", *GOOD, "--from-weights", "{root}/list.pt"], 2,
     "holds a list, not a state_dict"),
    ("data() raising", ["transform", "{root}/data_raises.py", *GOOD], 2,
     f"data() failed: {{root}}/data_raises.py:{_RAISE_LINE}: ValueError: no data on this machine"),
    ("one-class data", ["transform", "{root}/one_class.py", *GOOD], 2, "needs at least two classes"),
    ("unwritable --out", ["transform", "{root}/tiny.py", "--out", "{root}/a_file/out", "--quiet"], 2,
     "is not writable"),
    ("non-empty --out without --force", ["transform", "{root}/tiny.py", "--out", "{root}/good"], 2,
     "is not empty; choose another --out or pass --force"),
    ("--force over a folder of other files", ["transform", "{root}/tiny.py", "--out", "{root}", "--force"], 2,
     "holds files archir did not write"),
    ("--resume with nothing to resume", ["transform", "{root}/tiny.py", "--out", "{root}/good", "--resume"], 2,
     "--resume: no checkpoint of an interrupted run"),
    ("export: input shape that does not fit", ["export", "{root}/good", "--input-shape", "1,5,8,8"], 2,
     "cannot take the inputs f32[1,5,8,8] (from --input-shape)"),
    ("export: opset 3", ["export", "{root}/good", "--opset", "3"], 2, "--opset 3 is not one archir can export"),
    ("export: opset 99", ["export", "{root}/good", "--opset", "99"], 2, "--opset 99 is not one archir can export"),
    ("export: atol nan", ["export", "{root}/good", "--atol", "nan"], 2, "--atol must be a finite number >= 0"),
]


@pytest.mark.parametrize("case, command, code, fragment", CASES, ids=[c[0] for c in CASES])
def test_mistake_is_one_clear_line_and_changes_nothing(root, case, command, code, fragment):
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    before = _tree(root)
    res = run(*(a.format(root=root) for a in command))
    lines = [line for line in res.output.splitlines() if line.startswith("archir:")]
    assert res.exit_code == code, res.output
    assert lines == [lines[0]] and lines[0].startswith("archir: error: "), res.output
    assert fragment.format(root=root) in lines[0], res.output
    assert "bug in archir" not in res.output and "Traceback" not in res.output
    assert _tree(root) == before  # nothing written, nothing lost (staging folders included)


def test_out_without_room_is_refused_before_training(root, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("archir.preflight.shutil.disk_usage", lambda p: usage(10**6, 10**6 - 5000, 5000))
    before = _tree(root)
    res = run("transform", root / "tiny.py", *[a.format(root=root) for a in GOOD])
    assert res.exit_code == 2 and "4.9 KiB" not in res.output and "MiB free, this run needs about" in res.output
    assert _tree(root) == before


def test_force_replaces_the_whole_set_and_ignores_leftovers(root, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(root / "good", out)  # a finished run's outputs
    assert {"model.onnx", "checkpoint.pt"} <= set(os.listdir(out))
    # a killed run's leftovers: a half-written checkpoint in the staging folder and in --out
    staging = staging_dir(out)
    staging.mkdir()
    (staging / ".checkpoint.pt.abc123.tmp").write_bytes(b"half")
    (out / ".weights.pt.xyz.tmp").write_bytes(b"half")
    res = run("transform", root / "tiny.py", "--out", out, "--force", "--epochs", "0", "--no-onnx", "--quiet")
    assert res.exit_code == 0, res.output
    # the new set only: no model.onnx or checkpoint.pt of the earlier run beside it
    assert sorted(os.listdir(out)) == ["arch.png", "graph.svg", "model.py", "report.json", "report.md", "weights.pt"]
    assert not staging.exists()
    # a staging folder of temporaries only (killed before its first checkpoint) does not block a new run
    staging.mkdir()
    (staging / ".checkpoint.pt.def456.tmp").write_bytes(b"half")
    res = run("transform", root / "tiny.py", "--out", tmp_path / "fresh", "--epochs", "0", "--no-onnx", "--quiet")
    assert res.exit_code == 0, res.output


def test_export_never_deletes_the_verified_model(root, tmp_path, monkeypatch):
    import shutil

    from archir.backends import onnx_export

    d = tmp_path / "d"
    shutil.copytree(root / "good", d)
    verified = (d / "model.onnx").read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "_verify", interrupted)  # Ctrl-C during the ONNX Runtime check
    res = run("export", d)
    assert res.exit_code == 130 and "bug in archir" not in res.output, res.output
    assert (d / "model.onnx").read_bytes() == verified
    monkeypatch.undo()

    def mismatch(module, args, path, report, seed, providers):
        report.errors.append(onnx_export.OutputError("output", 2, [2, 4], 1.0, 1.0, 1.0, False))
        report.verified, report.passed = True, False

    monkeypatch.setattr(onnx_export, "_verify", mismatch)  # the check fails (as --atol 0 --rtol 0 may)
    res = run("export", d, "--atol", "0", "--rtol", "0")
    assert res.exit_code == 2 and "left as it was" in res.output, res.output
    assert (d / "model.onnx").read_bytes() == verified and (d / "model.unverified.onnx").is_file()
    assert not [p for p in os.listdir(d) if p.startswith(".")]  # no temporary folder left behind


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _cifar_folder(directory: Path, batch_1) -> None:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [0, 1]}
        if name == "data_batch_1" and batch_1 is not None:
            batch = batch_1
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = [f"class{i}".encode() for i in range(10)]
    (directory / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))


def test_crafted_cifar_pickle_runs_no_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    _cifar_folder(folder, {b"data": _RunsCode(), b"labels": [0, 1]})
    with pytest.raises(DataError, match=r"cannot read CIFAR pickle .*data_batch_1: it names posix.system"):
        load_dataset("cifar10", tmp_path / "cifar")
    assert not (tmp_path / "PWNED").exists()
    # what the format holds still reads, at protocol 2 (bytes via _codecs) and 5 (numpy buffers)
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for protocol in (2, 5):
        (tmp_path / "ok").write_bytes(pickle.dumps({b"data": array, b"labels": [1, 2], "name": "x"}, protocol=protocol))
        back = read_data_pickle(tmp_path / "ok")
        assert np.array_equal(back[b"data"], array) and back[b"labels"] == [1, 2] and back["name"] == "x"
    # and a whole (fake) CIFAR folder loads
    _cifar_folder(tmp_path / "ok_cifar" / "cifar-10-batches-py", None)
    train, _ = load_dataset("cifar10", tmp_path / "ok_cifar")
    assert len(train) > 0


def test_a_crash_between_the_two_renames_of_a_commit_is_repaired(tmp_path):
    from archir.fileio import recover_directory, replace_directory

    out, new = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    (out / "report.json").write_text("old")
    new.mkdir()
    (new / "report.json").write_text("new")
    os.replace(out, tmp_path / ".out.archir-old")  # the first rename happened, the second did not
    recover_directory(out)
    assert (out / "report.json").read_text() == "old" and not (tmp_path / ".out.archir-old").exists()
    replace_directory(new, out)
    assert (out / "report.json").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["out"]


def test_infinite_buffers_on_purpose_are_not_broken_weights(tmp_path):
    """A clamp bound kept as a buffer (timm's Gemma ViT: ``input_min = -inf``) is written out;
    only NaN in a buffer, or a non-finite parameter, means training broke the weights."""
    from torch import nn
    from torch.nn import functional as F

    import archir

    class Clamped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.res, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Linear(4, 2)
            self.register_buffer("low", torch.tensor(float("-inf")))

        def forward(self, x):
            x = F.relu(self.conv(x))
            x = x + self.res(x).clamp(min=self.low)
            return self.head(x.mean((2, 3)))

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 8, 8, generator=g), torch.arange(16) % 2)
    res = archir.transform(Clamped(), torch.randn(2, 3, 8, 8), "dnat", data, data, out=tmp_path / "out",
                           epochs=1, arch_epochs=1, batch_size=8, onnx=False, progress=False)
    assert float(res.module.state_dict()["low"]) == float("-inf") and (tmp_path / "out" / "model.py").is_file()


def test_nothing_to_search_is_said_not_silent(capsys):
    """A method that finds no candidate (proxyless on a model without k×k convolutions) still
    trains the weights, and says so once, whatever the progress setting."""
    from torch import nn

    import archir

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 6, generator=g), torch.arange(16) % 2)
    archir.transform(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(2, 6), "proxyless",
                     data, data, epochs=1, arch_epochs=1, batch_size=8, onnx=False, progress=False)
    err = capsys.readouterr().err
    assert err.count("warning: proxyless finds nothing to search in Sequential") == 1
    assert "this run only trains the weights" in err
