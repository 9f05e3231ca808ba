"""``archir inspect``: output, files, and one clear line with exit code 2 on user errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from archir.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def test_inspect_prints_summary_and_table(tmp_path):
    res = run("inspect", EXAMPLES / "resnet20.py", "--json", tmp_path / "g.json", "--dot", tmp_path / "g.dot",
              "--text", tmp_path / "g.txt")
    assert res.exit_code == 0, res.output
    assert "traced with torch.fx, granularity=layer" in res.output
    assert "parameters  272,474" in res.output
    assert "could become identity" in res.output
    assert "layer1.0.conv1 · layer1.0.bn1 · relu" in res.output
    rows = {line.split()[0]: line for line in res.output.splitlines() if line.startswith("e")}
    assert rows["e1"].endswith("parametrised: conv/linear (+ norm)")  # the table says what is searched
    assert rows["e3"].endswith("shortcut into a sum") and rows["e4"].endswith("  -")  # post-sum ReLU fixed
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["summary"]["parameters"] == 272474 and len(data["edges"]) == data["summary"]["edges"]
    searchable = {e["id"]: e["searchable"] for e in data["edges"]}
    assert searchable["e4"] is None and searchable["e3"]["why"] == "shortcut into a sum"
    assert set(searchable["e1"]["choices"]) == {"identity", "same"}  # not into a sum: never none
    assert set(searchable["e2"]["choices"]) == {"none", "identity", "same"}
    assert (tmp_path / "g.dot").read_text().startswith("digraph")
    assert (tmp_path / "g.txt").read_text().startswith("graph ResNet")


def test_leaf_module_keeps_a_submodule_whole_and_a_wrong_path_is_one_error(tmp_path):
    res = run("inspect", EXAMPLES / "resnet20.py", "--leaf-module", "layer1", "--leaf-module", "layer2.0")
    assert res.exit_code == 0, res.output
    assert "opaque      layer1 (requested), layer2.0 (requested)" in res.output
    assert "layer1.0.conv1" not in res.output and "layer2.1.conv1" in res.output
    assert "FLOPs       40.81M" in res.output  # the opaque blocks' convolutions still count
    res = run("inspect", EXAMPLES / "resnet20.py", "--leaf-module", "layer9")
    assert res.exit_code == 2 and "leaf module 'layer9' is not in ResNet (its children: conv1" in res.output
    res = run("transform", EXAMPLES / "resnet20.py", "--leaf-module", "layer1", "--epochs", "0", "--no-onnx",
              "--out", tmp_path / "out", "--quiet")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "layer1" in [op for d in report["decisions"] for op in d["ops"]]


def test_inspect_block_granularity_and_input_shape():
    res = run("inspect", EXAMPLES / "mbconv.py", "--granularity", "block", "--input-shape", "1,3,32,32")
    assert res.exit_code == 0, res.output
    assert "granularity=block" in res.output and "product" in res.output


def _write(tmp_path, text, name="m.py"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("case, expected", [
    ("missing", "model file not found"),
    ("import_error", "error while importing"),
    ("no_model", "defines no model"),
    ("bad_shape", "bad input shape"),
    ("wrong_shape", "fails on the example input"),
    ("untraceable", "cannot trace"),
])
def test_inspect_user_errors_exit_2_with_one_line(tmp_path, case, expected):
    if case == "missing":
        args = [tmp_path / "nope.py"]
    elif case == "import_error":
        args = [_write(tmp_path, "import torch\nraise RuntimeError('broken model file')\n")]
    elif case == "no_model":
        args = [_write(tmp_path, "x = 1\n")]
    elif case == "bad_shape":
        args = [EXAMPLES / "resnet20.py", "--input-shape", "1,three"]
    elif case == "wrong_shape":
        args = [EXAMPLES / "resnet20.py", "--input-shape", "1,5,32,32"]
    else:
        args = [_write(tmp_path, (
            "import torch\n"
            "class M(torch.nn.Module):\n"
            "    def forward(self, x):\n"
            "        if x.sum() > 0:\n"
            "            return x\n"
            "        return -x\n"
            "def build_model():\n    return M()\n"
            "def example_input():\n    return torch.randn(2, 3)\n"))]
    res = CliRunner().invoke(main, ["inspect", *map(str, args)])
    assert res.exit_code == 2, res.output
    err = res.stderr if hasattr(res, "stderr") else res.output
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("archir: error:") and expected in lines[0], err
    assert "Traceback" not in err
    if case == "import_error":
        assert "m.py:2" in lines[0]
    if case == "untraceable":
        assert "m.py:4" in lines[0]


def test_debug_shows_traceback(tmp_path):
    p = _write(tmp_path, "x = 1\n")
    proc = subprocess.run([sys.executable, "-m", "archir.cli", "--debug", "inspect", str(p)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "archir.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "inspect" in proc.stdout
