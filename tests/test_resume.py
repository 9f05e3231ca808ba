"""--resume: a run stopped by a signal (at an epoch's end or in the middle of one) and resumed from
its checkpoint ends bit for bit where the uninterrupted run ends, on CPU; checkpoints load with
``weights_only=True``; --nan-policy stop/skip."""
from __future__ import annotations

import json
import os
import signal
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import archir
from archir.errors import NonFiniteLoss, RunInterrupted, UserInputError
from archir.output_dir import staging_dir

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.res = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = nn.Dropout(0.2)  # draws from the global generator: the resume must restore it
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = x + F.relu(self.res(x))
        return self.head(self.drop(x.mean((2, 3))))


class SignalAt(torch.utils.data.TensorDataset):
    """Sends ``signum`` to this process at the ``at``-th sample read (None: never): a fault
    injected at a fixed point of the run, in the middle of an epoch."""

    def __init__(self, *tensors, at=None, signum=signal.SIGINT):
        super().__init__(*tensors)
        self.at, self.signum, self.reads = at, signum, 0

    def __getitem__(self, i):
        self.reads += 1
        if self.at is not None and self.reads == self.at:
            os.kill(os.getpid(), self.signum)
        return super().__getitem__(i)


def _data(at=None, signum=signal.SIGINT):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 3, 8, 8, generator=g), torch.randint(0, 4, (48,), generator=g)
    return SignalAt(x, y, at=at, signum=signum), torch.utils.data.TensorDataset(x[:16], y[:16])


def _run(out, train, val, method="dnat", **kw):
    torch.manual_seed(0)
    opts = dict(epochs=4, arch_epochs=2, warmup_epochs=0, batch_size=16, arch_lr=0.5, share="full",
                onnx=False, progress=False)
    opts.update(kw)
    return archir.transform(Net(), torch.randn(2, 3, 8, 8), method, train, val, out, **opts)


def _same_result(a, b):
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ra, rb = (json.loads((r.out / "report.json").read_text()) for r in (a, b))
    for r in (ra, rb):
        del r["time_seconds"]
        for h in r["history"]:
            del h["seconds"], h["train_seconds"]
        r["options"].pop("resume"), r["options"].pop("force")
        r.get("architecture_search", {}).pop("seconds", None)
    assert ra == rb


@pytest.mark.parametrize("method, options, arch_update, at, signum, stage", [
    # after the first epoch: on_epoch signals, the checkpoint is the epoch's own
    ("dnat", {}, "alternate", "epoch", signal.SIGTERM, "arch"),
    # in the middle of the third epoch (network stage), held-out θ batches in split mode
    ("dnat", {}, "split", 2 * 48 + 40, signal.SIGINT, "net"),
    # DSO-NAS's FLOPs-budget controller (state of the method's own) continues where it was
    ("dso", {"target_flops": 0.7, "gamma": 0.05, "epochs": 3}, "split", "epoch", signal.SIGTERM, "arch"),
    # NAO stopped in the network stage: the resumed run derives the architecture NAO chose, not a new search
    ("nao", {"initial": 4, "rounds": 1, "top_k": 2, "nao_epochs": 20, "eval_batches": 1, "calibration_batches": 1},
     "split", "epoch2", signal.SIGTERM, "net"),
])
def test_resume_is_bit_identical(tmp_path, method, options, arch_update, at, signum, stage):
    train, val = _data()
    kw = dict(method=method, arch_update=arch_update, **options)
    reference = _run(tmp_path / "ref", train, val, **kw)

    out = tmp_path / "run"
    (out).mkdir()
    (out / "report.json").write_text("{}")  # an earlier run's outputs: kept whole until the new run succeeds
    on_epoch = None
    if str(at).startswith("epoch"):  # after epoch k ("epoch": the first)
        train2, val2 = _data()
        stop_after = int(at[5:] or 0)

        def on_epoch(record):
            if record.epoch == stop_after:
                os.kill(os.getpid(), signum)
    else:
        train2, val2 = _data(at=at, signum=signum)
    with pytest.raises(RunInterrupted) as info:
        _run(out, train2, val2, on_epoch=on_epoch, force=True, **kw)
    assert info.value.exit_code == 128 + signum
    assert (out / "report.json").read_text() == "{}" and sorted(os.listdir(out)) == ["report.json"]
    ck = torch.load(staging_dir(out) / "checkpoint.pt", weights_only=True)
    assert ck["stage"] == stage and (ck["step"] == 0) == str(at).startswith("epoch")

    train2.at = None
    with pytest.raises(UserInputError, match="interrupted run .* --resume"):  # a plain rerun is refused
        _run(out, train2, val2, **kw)
    with pytest.raises(UserInputError, match="--resume: the interrupted run used --lr 0.1"):
        _run(out, train2, val2, resume=True, lr=0.2, **kw)
    resumed = _run(out, train2, val2, resume=True, force=True, **kw)
    _same_result(reference, resumed)
    assert not staging_dir(out).exists() and (out / "checkpoint.pt").is_file()


def test_resume_without_checkpoint_is_refused(tmp_path):
    train, val = _data()
    with pytest.raises(UserInputError, match="--resume: no checkpoint"):
        _run(tmp_path / "none", train, val, resume=True)


def test_nan_policy_stop_names_epoch_and_step_and_keeps_the_checkpoint(tmp_path):
    train, val = _data()
    calls = {"n": 0}

    def loss(output, target):  # finite for the first epoch (3 steps), then NaN at the 2nd step of epoch 2
        calls["n"] += 1
        value = F.cross_entropy(output, target)
        return value * float("nan") if torch.is_grad_enabled() and calls["n"] == 8 else value

    task = archir.make_task(loss=loss)
    with pytest.raises(NonFiniteLoss, match=r"became nan in epoch 2 \(arch stage\), step 2; the last good "
                                            r"checkpoint \(after epoch 1\) is kept"):
        _run(tmp_path / "o", train, val, task=task, arch_update="joint")
    ck = torch.load(staging_dir(tmp_path / "o") / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 0 and ck["next_epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())

    calls["n"] = 0
    res = _run(tmp_path / "o", train, val, task=task, arch_update="joint", nan_policy="skip", force=True)
    assert [h["skipped_steps"] for h in res.report["history"]] == [0, 1, 0, 0]
    assert res.report["history"][1]["steps"] == 3
    assert all(torch.isfinite(v).all() for v in res.module.state_dict().values() if v.is_floating_point())


MODEL_FILE = textwrap.dedent('''
    import os
    import signal

    import torch
    from torch import nn
    import torch.nn.functional as F

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(F.relu(self.conv(x)).mean((2, 3)))

    def build_model():
        return Net()

    def example_input():
        return torch.randn(2, 3, 8, 8)

    class SigtermAt(torch.utils.data.TensorDataset):
        reads = 0

        def __getitem__(self, i):
            SigtermAt.reads += 1
            if SigtermAt.reads == int(os.environ.get("KILL_AT_READ", "0")):
                os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` would, in the second epoch
            return super().__getitem__(i)

    def data():
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(48, 3, 8, 8, generator=g), torch.randint(0, 4, (48,), generator=g)
        return SigtermAt(x, y), torch.utils.data.TensorDataset(x[:16], y[:16])
''')


def test_cli_sigterm_says_how_to_resume_and_resume_finishes(tmp_path, monkeypatch):
    """SIGTERM in the middle of the second epoch: exit 143 and a line with the command that
    resumes; that command's weights equal those of an uninterrupted run."""
    from click.testing import CliRunner

    from archir.cli import main

    model = tmp_path / "m.py"
    model.write_text(MODEL_FILE)
    args = ["transform", str(model), "--epochs", "3", "--arch-epochs", "2", "--batch-size", "16", "--no-onnx",
            "--quiet"]
    ref = CliRunner().invoke(main, args + ["--out", str(tmp_path / "ref")])
    assert ref.exit_code == 0, ref.output
    out = tmp_path / "run"
    monkeypatch.setenv("KILL_AT_READ", str(48 + 20))
    monkeypatch.setattr(sys, "argv", ["archir", *args, "--out", str(out)])
    res = CliRunner().invoke(main, args + ["--out", str(out)])
    assert res.exit_code == 143, res.output
    # this model has nothing to search: one warning line says so; the stop itself is three lines
    lines = [line for line in res.output.splitlines()
             if line.startswith("archir:") and not line.startswith("archir: warning: dnat finds nothing")]
    assert len(lines) == 3 and "Traceback" not in res.output, res.output
    assert any(line.startswith("archir: stopped by SIGTERM in epoch 2/3 (arch stage) after step 1 of 3; "
                               "checkpoint written to ") for line in lines), res.output
    again = [line for line in lines if line.startswith("archir: to continue, run the same command with --resume: ")]
    assert len(again) == 1 and again[0].endswith(f"--out {out} --resume"), res.output
    assert not out.exists()
    monkeypatch.delenv("KILL_AT_READ")
    done = CliRunner().invoke(main, args + ["--out", str(out), "--resume"])
    assert done.exit_code == 0, done.output
    a = torch.load(out / "weights.pt", weights_only=True)
    b = torch.load(tmp_path / "ref" / "weights.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
