"""``archir transform --nproc 2``: two CPU processes (gloo) through torch.distributed's elastic
launcher reach the architecture and the metric of one process with the same global batch, rank 0
alone writes, and a failing rank ends the run with a clear message instead of a hang."""
from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from archir.cli import main
from archir.distributed import World

from model_patterns import tiny_model_file

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = tiny_model_file(examples=40, labels="torch.randint(0, 4, (40,), generator=g)", extra='''

def loss(output, target):
    if os.environ.get("FAIL_RANK") == os.environ.get("RANK", "0"):
        raise ValueError("this process's loss is broken")
    return F.cross_entropy(output, target)
''')

ARGS = ["--epochs", "3", "--arch-epochs", "2", "--warmup-epochs", "0", "--arch-lr", "0.5", "--share", "full",
        "--batch-size", "16", "--no-onnx", "--quiet"]


def _launch(model, out, monkeypatch, capfd, extra_env=()):
    """``archir transform ... --nproc 2`` with the launcher in this process (as the CLI calls it):
    (exit code, the processes' stdout, stderr)."""
    from archir import distributed

    for k, v in {"OMP_NUM_THREADS": "1", **dict(extra_env)}.items():
        monkeypatch.setenv(k, v)
    capfd.readouterr()
    code = distributed.launch(2, ["transform", str(model), *ARGS, "--out", str(out)])
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def test_two_processes_match_one(tmp_path, monkeypatch, capfd):
    model = tmp_path / "m.py"
    model.write_text(MODEL)
    one = CliRunner().invoke(main, ["transform", str(model), *ARGS, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    code, out, err = _launch(model, tmp_path / "two", monkeypatch, capfd)
    assert code == 0, err[-3000:]
    assert out.count("edges changed") == 1  # one summary, from rank 0
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert b["distributed"] == {"processes": 2, "backend": "gloo"}
    assert [d["decision"] for d in a["decisions"]] == [d["decision"] for d in b["decisions"]]
    for x, y in zip(a["history"], b["history"], strict=True):  # 40 examples: a last batch of 8, 4 per process
        assert x["steps"] == y["steps"] == 3
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["val_accuracy" if "val_accuracy" in x else "val_metric"] == pytest.approx(
            y["val_accuracy" if "val_accuracy" in y else "val_metric"], abs=1e-6)
    wa, wb = (torch.load(tmp_path / d / "weights.pt", weights_only=True) for d in ("one", "two"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []  # staging folders committed


def test_a_failing_rank_stops_the_run_cleanly(tmp_path, monkeypatch, capfd):
    model = tmp_path / "m.py"
    model.write_text(MODEL)
    code, _, err = _launch(model, tmp_path / "out", monkeypatch, capfd, {"FAIL_RANK": "1", "ARCHIR_DIST_TIMEOUT": "5"})
    assert code == 2, err[-3000:]
    assert "this process's loss is broken" in err  # rank 1's own line; rank 0 stops instead of waiting
    assert "bug in archir" not in err and not (tmp_path / "out").exists()


def test_shard_splits_like_tensor_split_and_weights_by_size():
    batch = (torch.arange(10).view(5, 2), torch.arange(5))
    parts = [World(r, 2, r, torch.device("cpu"), "gloo").shard(batch) for r in range(2)]
    assert [w for _, w in parts] == [3.0, 2.0]
    assert torch.equal(torch.cat([p[1] for p, _ in parts]), batch[1])
    small = [World(r, 4, r, torch.device("cpu"), "gloo").shard({"x": torch.ones(2, 3)}) for r in range(4)]
    assert [w for _, w in small] == [1.0, 1.0, 0.0, 0.0]  # ranks without an example count for nothing
    assert small[3][0]["x"].shape == (2, 3) and small[1][0]["x"].shape == (1, 3)
