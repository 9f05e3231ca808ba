"""The baseline comparison of a report: the original trained alone next to the transformed model.

Both were trained on the same data, epoch budget, seed and device (``archir transform
--baseline``). Compared: the validation metric, parameters, FLOPs (multiply-adds per example),
ONNX Runtime latency at the example's batch size (both exported and checked with the same
exporter, timed interleaved in one process: median of ``runs`` after ``warmup``), and the
training wall time. Differences are transformed − original; ratios transformed / original.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch.utils._pytree as pytree
from torch import nn


def onnx_latencies(modules: dict[str, nn.Module], inputs: tuple, *, warmup: int = 5, runs: int = 30
                   ) -> dict[str, dict[str, Any]]:
    """Median ONNX Runtime latency in seconds of each module, timed interleaved (one run of each
    per round), so a noisy machine slows all of them alike. A module that cannot be exported gets
    ``{"error": ...}`` instead."""
    from archir.backends.onnx_export import common_batch, export_onnx, ort_session

    out: dict[str, dict[str, Any]] = {}
    sessions = {}
    with tempfile.TemporaryDirectory(prefix="archir-latency-") as tmp:
        for name, module in modules.items():
            path = Path(tmp) / f"{name}.onnx"
            try:
                report = export_onnx(module, inputs, path, dynamic_batch=False)
            except Exception as exc:  # noqa: BLE001 - latency is informative, never fatal
                out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                continue
            session = ort_session(path, spinning=False)  # timed interleaved with the others
            wanted = {i.name for i in session.get_inputs()}  # the tensors of the arguments, by name
            feed = {n: x.detach().cpu().numpy() for n, x in zip(report.input_names, pytree.tree_leaves(inputs))
                    if n in wanted}
            sessions[name] = (session, feed)
            out[name] = {"providers": list(session.get_providers())}
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for i in range(warmup + runs):
            for name, (session, feed) in sessions.items():
                t = time.perf_counter()
                session.run(None, feed)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        out[name].update(median_seconds=statistics.median(ts), batch=common_batch(pytree.tree_leaves(inputs)))
    return out


def _diff(a, b):
    return None if a is None or b is None else b - a


def _ratio(a, b):
    return None if not a or b is None else b / a


def compare(original: nn.Module, transformed: nn.Module, inputs: tuple, original_run, transformed_run,
            original_graph, transformed_graph) -> dict[str, Any]:
    """The side-by-side record for report.json (``original_run``/``transformed_run`` are the
    trainer's results)."""
    metric = transformed_run.metric_name
    latency = onnx_latencies({"original": original, "transformed": transformed}, inputs)
    rows = {
        f"val_{metric}": (original_run.val_metric, transformed_run.val_metric),
        "val_loss": (original_run.val_loss, transformed_run.val_loss),
        "parameters": (original_graph.total_params(), transformed_graph.total_params()),
        "flops_per_example": (original_graph.total_flops(), transformed_graph.total_flops()),
        "onnx_latency_seconds": (latency["original"].get("median_seconds"),
                                 latency["transformed"].get("median_seconds")),
        "train_seconds": (sum(original_run.stage_seconds.values()), sum(transformed_run.stage_seconds.values())),
    }
    return {
        "metric": metric,
        "rows": {k: {"original": a, "transformed": b, "difference": _diff(a, b), "ratio": _ratio(a, b)}
                 for k, (a, b) in rows.items()},
        "onnx_latency": latency,
        "note": "both trained on the same data, epochs, seed and device; difference = transformed - original",
    }


def comparison_markdown(cmp: dict[str, Any]) -> list[str]:
    """The comparison as a Markdown table (lines)."""
    from archir.ir.printer import human

    def fmt(key: str, v) -> str:
        if v is None:
            return "–"
        if key.startswith("val_accuracy"):
            return f"{100 * v:.2f}%"
        if key == "onnx_latency_seconds":
            return f"{1e3 * v:.3f} ms"
        if key == "train_seconds":
            return f"{v:.1f} s"
        if key in ("parameters", "flops_per_example"):
            return human(v) if key == "flops_per_example" else f"{v:,}"
        return f"{v:.4g}"

    lines = ["| | original (trained alone) | transformed | difference | ratio |", "|---|---|---|---|---|"]
    for key, row in cmp["rows"].items():
        diff = row["difference"]
        sign = "+" if diff is not None and diff > 0 else ""
        d = "–" if diff is None else (f"{sign}{100 * diff:.2f} points" if key.startswith("val_accuracy")
                                      else sign + fmt(key, diff))
        r = "–" if row["ratio"] is None else f"{row['ratio']:.3f}"
        lines.append(f"| {key.replace('_', ' ')} | {fmt(key, row['original'])} | {fmt(key, row['transformed'])} "
                     f"| {d} | {r} |")
    return lines
