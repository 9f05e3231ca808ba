"""Run-time guards: the model's own checks on its data, kept in a traced graph.

A traced graph follows one path through the model's Python code. Where that code checks a
value the trace cannot keep symbolic and raises when the check fails (``if
degenerate_boxes.any(): raise ...`` in a torchvision detector, ``torch._assert(boxes.shape[-1]
== 4, ...)``), the value tracer (:mod:`archir.frontends.value_trace`) takes the example's answer
``c₀`` (the check passes) and records

    ``y = guard(x, c, c₀, what)``  ≡  ``x`` if ``bool(c) == c₀``, else an error saying ``what``

on a tensor ``x`` that the condition was computed from and that the graph reads again later;
those later reads go through ``y``. The guard is an identity on ``x``: passes treat it as one,
and it stays in the graph as long as what depends on ``x`` does. A run whose check fails
stops with that error, as the original model does. A branch on the input's sizes
(``if boxes.numel() == 0``) is guarded the same way: a run with sizes that take the other
branch is refused.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx

if TYPE_CHECKING:
    from .graph import Graph


def guard(value, condition, expected, what):
    """``value`` itself, once ``bool(condition)`` is found to be ``expected`` (as on the traced
    example: the model's check passes); otherwise a RuntimeError saying ``what`` that means.
    Exporters (torch.export, ONNX) trace through without the check: it reads the data, and an
    exported graph has no branches."""
    exporting = getattr(torch.compiler, "is_exporting", bool)() or torch.onnx.is_in_onnx_export()
    if not exporting and bool(condition) != expected:
        raise RuntimeError(f"{what} (the condition is {not expected} here, {expected} on the traced example)")
    return value


def check_length(items, expected: int, where: str):
    """``items`` itself when it has ``expected`` items, as the list or tuple ``where`` of the
    traced example had; otherwise a ValueError. A traced graph reads such an argument's items by
    position (a detector's images: ``images[0]``, ``images[1]``), so with more items it would
    silently leave the rest out, and with fewer fail deep inside."""
    if len(items) != expected:
        raise ValueError(f"{where} has {len(items)} items; the model was traced on an example where it has "
                         f"{expected}, and the traced graph reads them by position: give {expected} (a batch of "
                         f"{expected}), or trace it on an example with as many as you will give")
    return items


def graph_guards(g: "Graph") -> list[str]:
    """What each guard of ``g`` checks, and where (see the module docstring), in edge order;
    guards inside a searched edge's candidates count once per candidate that holds them, and
    those of one mode's end are there too."""
    def walk(ops):
        for op in ops:
            if op.kind == "choice":
                yield from walk(op for path in op.args if isinstance(path, tuple) for op in path)
            elif op.kind == "call_function" and op.target is guard:
                yield str(op.args[3])
            elif op.kind == "call_module":  # one mode's end (frontends/mode_split.ByMode)
                for m in fetch_attr(g.root, op.target).modules():
                    if isinstance(m, fx.GraphModule):
                        yield from (str(n.args[3]) for n in m.graph.nodes if n.target is guard)

    from .graph import fetch_attr

    ops = [op for e in g.edges.values() for op in e.ops]
    ops += [j.combine.op for j in g.junctions.values() if j.combine is not None and j.combine.op is not None]
    return list(walk(ops))
