"""A model's own checks on its data (``assert``, ``torch._assert``, ``if bad: raise``) are kept in
the traced graph as run-time guards (archir/ir/guards.py), through search, derive, model.py and
ONNX; any other branch on the data is still refused."""
from __future__ import annotations

import inspect
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import archir
from archir.errors import TraceError
from archir.ir.guards import graph_guards
from archir.summary import format_summary

from model_patterns import assert_same


class ChecksItsInputs(nn.Module):
    """Checks its boxes three ways before using them; its residual branch is searchable."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.branch = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x, boxes):
        assert boxes.shape[-1] == 4, "boxes are N x 4"
        torch._assert((boxes >= 0).all(), "boxes are not negative")
        if (boxes[:, 2:] <= boxes[:, :2]).any():
            raise ValueError("a box has no area")
        h = self.stem(x)
        return h + self.branch(h) + boxes.sum()


def _boxes(n=3):
    corner = torch.rand(n, 2)
    return torch.cat([corner, corner + 0.1 + torch.rand(n, 2)], 1)


_LINES = {what: inspect.getsourcelines(ChecksItsInputs.forward)[1] + i
          for i, what in enumerate(["def", "assert", "_assert", "if"])}
_BAD = {"assert": torch.rand(3, 5), "_assert": -_boxes(), "if": _boxes().flip(1)}


def test_checks_on_the_data_are_kept_as_guards_that_refuse_what_the_model_refuses():
    torch.manual_seed(0)
    model = ChecksItsInputs()
    x, boxes = torch.randn(2, 4), _boxes()
    g = archir.trace(model, (x, boxes))
    g.verify()
    where = graph_guards(g)
    assert len(where) == 3
    for what in ("assert", "_assert", "if"):
        assert any(f"test_guards.py:{_LINES[what]}" in w for w in where), (what, where)
    assert "guards      3 checked at run time (a failure says:)\n    - the model's own check at" in format_summary(g)
    lowered = g.to_module()
    with torch.no_grad():
        for args in ((x, boxes), (torch.randn(5, 4), _boxes(7))):  # other sizes: nothing fixed
            assert_same(model(*args), lowered(*args))
        for what, bad in _BAD.items():
            with pytest.raises((AssertionError, RuntimeError, ValueError)):
                model(x, bad)
            with pytest.raises(RuntimeError, match=rf"own check at .*test_guards.py:{_LINES[what]} .*fails"):
                lowered(x, bad)


def test_search_derive_model_py_and_onnx_keep_the_checks(tmp_path):
    torch.manual_seed(0)
    model = ChecksItsInputs()
    x, boxes = torch.randn(2, 4), _boxes()
    s = archir.search(model, (x, boxes), method="dnat")
    assert s.decisions()  # the residual branch
    assert len(graph_guards(s.graph)) == 3
    with torch.no_grad():
        assert_same(model(x, boxes), s.supernet(x, boxes))
        derived = s.derive()
        assert_same(model(x, boxes), derived(x, boxes))
        with pytest.raises(RuntimeError, match="own check"):
            derived(x, _BAD["if"])
    files = s.emit(tmp_path / "out")
    assert {"model.py", "weights.pt", "model.onnx"} <= set(files)  # ONNX checked against ONNX Runtime
    assert re.search(r"def guard\w*\(value, condition", (tmp_path / "out" / "model.py").read_text())
    torch.save({"x": x, "boxes": boxes, "bad": _BAD["if"], "ref": model(x, boxes)}, tmp_path / "io.pt")
    check = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path / 'out')!r})
        import model
        io = torch.load({str(tmp_path / 'io.pt')!r})
        m = model.load_model()
        torch.testing.assert_close(m(io["x"], io["boxes"]), io["ref"])
        try:
            m(io["x"], io["bad"])
        except RuntimeError as exc:
            assert "own check" in str(exc), exc
        else:
            raise SystemExit("model.py did not check its input")
    """)
    subprocess.run([sys.executable, "-c", check], check=True)


class BranchesOnTheData(nn.Module):
    def __init__(self, returns: bool):
        super().__init__()
        self.returns = returns

    def forward(self, x):
        if self.returns:
            if x.sum() > 0:
                return x
            return -x
        if (x > 3).any():  # the other branch computes, it does not raise
            x = x * 2
        return x + 1


@pytest.mark.parametrize("returns", [True, False])
def test_a_branch_on_the_data_is_not_a_check_and_stays_refused(returns):
    with pytest.raises(TraceError, match="branches on tensor values"):
        archir.trace(BranchesOnTheData(returns), (torch.randn(2, 3),))
