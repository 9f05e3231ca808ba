"""Runs a user can watch and compare: progress lines in logs, --log-dir (CSV, TensorBoard), archir compare."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from archir.cli import main
from archir.progress import Progress
from archir.run_compare import compare_runs, load_run, render

# A tiny residual model on the bundled digits data (3x32x32 images, 10 classes): seconds per run.
MODEL_PY = '''
import torch
from torch import nn
import torch.nn.functional as F

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        h = F.relu(self.stem(x))
        return self.head(F.relu(h + self.c(h)).mean((2, 3)))

def build_model():
    return Tiny()

def example_input():
    return torch.randn(2, 3, 32, 32)
'''

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.py"
    path.write_text(MODEL_PY)
    return path


@pytest.fixture(scope="module")
def two_seeds(model_file, tmp_path_factory):
    """Two finished runs of the same settings, seeds 0 and 1, the first with --log-dir."""
    root = tmp_path_factory.mktemp("runs")
    runner = CliRunner()
    for seed in (0, 1):
        extra = ["--log-dir", str(root / "logs")] if seed == 0 else []
        r = runner.invoke(main, ["transform", str(model_file), "--epochs", "3", "--arch-epochs", "2",
                                 "--subset", "256", "--batch-size", "64", "--seed", str(seed), "--quiet",
                                 "--out", str(root / f"seed{seed}"), *extra])
        assert r.exit_code == 0, r.output
    return root


# -- progress --------------------------------------------------------------------------------

def test_progress_in_a_log_is_plain_lines_with_rate_and_eta():
    stream = io.StringIO()  # not a terminal
    bar = Progress(range(4), desc="arch 1/3", stream=stream, interval=0.0, items_per_step=32)
    for i in bar:
        bar.set_postfix({"loss": f"{2.0 - i / 10:.4f}"})
    lines = stream.getvalue().splitlines()
    assert lines[0] == "archir: arch 1/3: starting, 4 steps"
    assert lines[1].startswith("archir: arch 1/3: 1/4 steps (25%), ") and "img/s" in lines[1] and "ETA" in lines[1]
    assert "loss 1.8000" in lines[-2] and "3/4 steps (75%)" in lines[-2]
    assert "4/4 steps (100%)" in lines[-1] and "loss 1.7000" in lines[-1] and "done in" in lines[-1]
    quiet = io.StringIO()
    assert Progress(range(3), desc="x", stream=quiet, enabled=False).disable
    assert list(Progress(range(3), desc="x", stream=quiet, enabled=False)) == [0, 1, 2] and quiet.getvalue() == ""


def test_a_run_logging_to_a_file_shows_progress_before_its_first_epoch_ends(model_file, tmp_path):
    log = tmp_path / "run.log"
    env = {**os.environ, "ARCHIR_PROGRESS_INTERVAL": "0"}
    with open(log, "w") as f:  # stdout and stderr into one file, as under nohup
        proc = subprocess.run([sys.executable, "-m", "archir.cli", "transform", str(model_file), "--epochs", "1",
                               "--arch-epochs", "1", "--subset", "128", "--batch-size", "32", "--no-onnx",
                               "--out", str(tmp_path / "out")], stdout=f, stderr=subprocess.STDOUT, env=env,
                              timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text
    lines = text.splitlines()
    first_epoch = next(i for i, line in enumerate(lines) if "] epoch 1/1 " in line)
    progress = [i for i, line in enumerate(lines) if line.startswith("archir: arch 1/1: ") and " steps" in line]
    assert progress and progress[0] < first_epoch, text
    assert "\r" not in text  # no bar redrawn in place


# -- --log-dir -------------------------------------------------------------------------------

def test_log_dir_writes_one_csv_row_per_epoch_and_tensorboard_events(two_seeds):
    logs = two_seeds / "logs"
    rows = list(csv.DictReader((logs / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert [r["stage"] for r in rows] == ["arch", "arch", "net"]
    documented = {"epoch", "stage", "warmup", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
                  "arch_lr", "images_per_second", "epoch_seconds", "changed_edges"}
    assert documented <= set(rows[0])
    arch = [c for c in rows[0] if c.startswith("arch/")]
    report = json.loads((two_seeds / "seed0" / "report.json").read_text())
    assert arch and {c.split("/")[1] for c in arch} == set(report["initial_weights"])
    assert rows[0]["warmup"] == "1" and rows[0]["arch_lr"] == "" and rows[1]["arch_lr"] == "0.05"
    assert rows[2]["changed_edges"] == "" and all(r[arch[0]] == "" for r in rows[2:])  # net stage: no θ
    for r in rows:
        assert float(r["train_loss"]) > 0 and float(r["images_per_second"]) > 0
        assert float(r["val_accuracy"]) == pytest.approx(report["history"][int(r["epoch"]) - 1]["val_metric"])
    pytest.importorskip("tensorboard")
    assert list(logs.glob("events.out.tfevents.*"))


def test_log_dir_that_cannot_be_created_is_one_clear_error(model_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = CliRunner().invoke(main, ["transform", str(model_file), "--epochs", "1", "--subset", "64", "--quiet",
                                  "--no-onnx", "--log-dir", str(blocker / "logs")])
    assert r.exit_code == 2 and "--log-dir" in r.output and "Traceback" not in r.output


# -- archir compare --------------------------------------------------------------------------

def test_compare_two_seeds_side_by_side_with_mean_and_std(two_seeds, tmp_path):
    dirs = [two_seeds / "seed0", two_seeds / "seed1"]
    runs, tables = compare_runs(dirs)
    assert [r.seed for r in runs] == [0, 1] and runs[0].settings == runs[1].settings
    assert all(r.latency_ms is not None and r.latency_ms > 0 for r in runs)  # model.onnx timed
    header, rows = tables["runs"]
    assert header[:4] == ["run", "settings", "seed", "metric"] and len(rows) == 2
    assert rows[0][3] == f"accuracy {100 * runs[0].value:.2f}%"
    _, groups = tables["groups"]
    assert len(groups) == 1 and groups[0][1] == "2" and "±" in groups[0][3]
    md = tmp_path / "cmp.md"
    r = CliRunner().invoke(main, ["compare", *map(str, dirs), "--markdown", str(md), "--no-latency"])
    assert r.exit_code == 0, r.output
    assert "seed0" in r.output and "Mean ± std over seeds" in r.output
    assert md.read_text().startswith("| run | settings |")
    assert render(tables, "markdown").count("\n|---|") == 2


def test_compare_refuses_a_directory_without_a_finished_run(two_seeds, tmp_path):
    r = CliRunner().invoke(main, ["compare", str(two_seeds / "seed0"), str(tmp_path)])
    assert r.exit_code == 2 and "no report.json" in r.output
    with pytest.raises(Exception, match="does not exist"):
        load_run(tmp_path / "missing")


def test_run_log_of_a_resumed_run_keeps_the_finished_epochs(tmp_path):
    from archir.run_log import RunLog

    with RunLog(tmp_path, tensorboard=False) as log:
        for epoch in (1, 2, 3):
            log.log(epoch, {"train_loss": 1.0 / epoch, "stage": "arch"})
    with RunLog(tmp_path, tensorboard=False, keep_until=2) as log:  # resumed after epoch 2
        log.log(3, {"train_loss": 0.25, "stage": "net", "lr": 0.01})
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [(r["epoch"], r["stage"]) for r in rows] == [("1", "arch"), ("2", "arch"), ("3", "net")]
    assert rows[2]["lr"] == "0.01" and rows[0]["lr"] == "" and float(rows[1]["train_loss"]) == 0.5
