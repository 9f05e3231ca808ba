"""``archir compare DIR...``: finished runs side by side, and mean ± std over seeds.

Each DIR is the ``--out`` of a finished ``archir transform`` (its ``report.json``). One row per
run: method and the options that differ from the defaults, seed, the validation metric (with
the baseline's, when the run trained one), parameters, FLOPs per example, ONNX Runtime latency,
edges changed and wall time. The latency is measured now, the runs' ``model.onnx`` files timed
interleaved in one process (one run of each per round, so a noisy machine slows all alike), on
each run's example input (``--batch`` sets the batch size); without ``model.onnx`` the run's
baseline comparison supplies it, else it is left empty.

Runs whose settings are equal except for the seed (and where their outputs went) form a group;
every group of two or more gets a second table with mean ± sample standard deviation.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from .errors import UserInputError
from .ir.printer import human
from .output_dir import decision_changed

#: options that say where and how a run reported, not what it computed: never part of the settings
_NOT_SETTINGS = {"seed", "force", "progress", "resume", "log_dir", "onnx", "baseline", "out"}


@dataclasses.dataclass
class Run:
    """What ``archir compare`` reads from one run directory."""

    name: str
    directory: Path
    method: str
    settings: str  # method and the options that differ from the defaults
    seed: int | None
    metric: str
    value: float | None
    baseline: float | None
    parameters: int | None
    flops: int | None
    latency_ms: float | None
    changed: int | None
    searchable: int | None
    wall_seconds: float | None
    onnx_path: Path | None
    example_inputs: list = dataclasses.field(default_factory=list)  # [{"shape": [...], "dtype": "float32"}]


def _defaults(method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    from . import methods
    from .pipeline import TransformOptions

    common = {f.name: f.default for f in dataclasses.fields(TransformOptions)}
    try:
        own = {f.name: f.default for f in dataclasses.fields(methods.get(method).Options)}
    except UserInputError:  # a method not installed here: show all its options
        own = {}
    return common, own


def _differing(values: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    return [f"{k}={v}" for k, v in sorted(values.items())
            if k not in _NOT_SETTINGS and (k not in defaults or defaults[k] != v)]


def load_run(directory: str | Path) -> Run:
    """The :class:`Run` of ``directory``; a UserInputError when it holds no finished run."""
    d = Path(directory)
    path = d / "report.json"
    if not path.is_file():
        what = "does not exist" if not d.exists() else "has no report.json (not a finished archir transform run)"
        raise UserInputError(f"{d}: {what}; pass the --out directories of finished runs")
    try:
        r = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{path}: cannot read it as JSON ({exc}); is the run still writing it?") from exc
    method = r.get("method", "?")
    common, own = _defaults(method)
    options = dict(r.get("options") or {})
    for k in r.get("method_defaults") or {}:  # what the method suggests goes with its name
        options.pop(k, None)
    settings = ", ".join([method] + _differing(options, common) + _differing(r.get("method_options") or {}, own))
    metric = r.get("metric", "metric")
    t = r.get("transformed") or {}
    cmp = (r.get("baseline") or {}).get("rows") or {}
    base = cmp.get(f"val_{metric}", {}).get("original")
    lat = cmp.get("onnx_latency_seconds", {}).get("transformed")
    decisions = r.get("decisions") or []
    searchable = [d for d in decisions if d.get("param")]
    onnx = d / "model.onnx"
    return Run(name=d.name or str(d), directory=d, method=method, settings=settings, seed=r.get("seed"),
               metric=metric, value=t.get(f"val_{metric}"), baseline=base, parameters=t.get("parameters"),
               flops=t.get("flops_per_example"), latency_ms=1e3 * lat if lat is not None else None,
               changed=sum(1 for x in searchable if decision_changed(x)) if searchable else None,
               searchable=len(searchable) if searchable else None,
               wall_seconds=(r.get("time_seconds") or {}).get("total"),
               onnx_path=onnx if onnx.is_file() else None, example_inputs=list(r.get("example_inputs") or []))


def measure_latencies(runs: list[Run], batch: int | None = None, *, warmup: int = 5, repeats: int = 30) -> None:
    """Set ``latency_ms`` of every run with a model.onnx: median ONNX Runtime time, interleaved,
    on each run's example input (its batch size, or ``batch``)."""
    import time

    import numpy as np

    from .backends.onnx_export import ort_session

    sessions = {}
    for run in runs:
        if run.onnx_path is None:
            continue
        try:
            session = ort_session(run.onnx_path, spinning=False)  # timed interleaved
        except Exception:  # noqa: BLE001 - latency is informative: an unreadable file leaves it empty
            continue
        feed = {}
        examples = run.example_inputs if len(run.example_inputs) == len(session.get_inputs()) else []
        for k, i in enumerate(session.get_inputs()):
            # the run's own example input (its batch, or ``batch``); else the graph's shape, free dims 1
            shape = list(examples[k]["shape"]) if examples else [d if isinstance(d, int) else 1 for d in i.shape]
            if batch and shape:
                shape[0] = batch
            dtype = np.int64 if "int64" in i.type else np.int32 if "int32" in i.type else np.float32
            feed[i.name] = (np.random.default_rng(0).standard_normal(shape).astype(dtype)
                            if dtype == np.float32 else np.zeros(shape, dtype))
        sessions[run.name, id(run)] = (run, session, feed)
    times: dict[Any, list[float]] = {k: [] for k in sessions}
    for i in range(warmup + repeats):
        for key, (_, session, feed) in sessions.items():
            t = time.perf_counter()
            session.run(None, feed)
            if i >= warmup:
                times[key].append(time.perf_counter() - t)
    for key, (run, _, _) in sessions.items():
        run.latency_ms = 1e3 * statistics.median(times[key])


# -- tables ----------------------------------------------------------------------------------

_HEADER = ["run", "settings", "seed", "metric", "baseline", "parameters", "FLOPs", "ORT ms", "edges changed",
           "wall"]


def _metric(metric: str, v: float | None) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.2f}%" if metric == "accuracy" else f"{v:.4g}"


def _row(run: Run) -> list[str]:
    changed = f"{run.changed}/{run.searchable}" if run.searchable else "–"
    return [run.name, run.settings, "–" if run.seed is None else str(run.seed),
            f"{run.metric} {_metric(run.metric, run.value)}", _metric(run.metric, run.baseline),
            "–" if run.parameters is None else f"{run.parameters:,}",
            "–" if run.flops is None else human(run.flops),
            "–" if run.latency_ms is None else f"{run.latency_ms:.3f}", changed,
            "–" if run.wall_seconds is None else f"{run.wall_seconds:.1f} s"]


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of ``values``."""
    xs = list(values)
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _mean_std(values: list[float | None], fmt) -> str:
    xs = [v for v in values if v is not None]
    if not xs:
        return "–"
    if len(xs) == 1:
        return fmt(xs[0])
    mean, std = mean_std(xs)
    return f"{fmt(mean)} ± {fmt(std)}"


def groups(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by settings (everything but the seed), in first-seen order."""
    out: dict[str, list[Run]] = {}
    for run in runs:
        out.setdefault(run.settings, []).append(run)
    return out


def _percent(v: float) -> str:
    return f"{100 * v:.2f}%"


def _plain(v: float) -> str:
    return f"{v:.4g}"


def group_rows(runs: list[Run]) -> list[list[str]]:
    """One row per group of two or more runs: n, seeds and mean ± std of every figure."""
    rows = []
    for settings, members in groups(runs).items():
        if len(members) < 2:
            continue
        metric = members[0].metric
        pct = _percent if metric == "accuracy" else _plain

        rows.append([settings, str(len(members)), ",".join(str(m.seed) for m in members),
                     f"{metric} " + _mean_std([m.value for m in members], pct),
                     _mean_std([m.baseline for m in members], pct),
                     _mean_std([m.parameters for m in members], lambda v: f"{v:,.0f}"),
                     _mean_std([m.flops for m in members], lambda v: human(int(v))),
                     _mean_std([m.latency_ms for m in members], lambda v: f"{v:.3f}"),
                     _mean_std([m.changed for m in members], lambda v: f"{v:.1f}"),
                     _mean_std([m.wall_seconds for m in members], lambda v: f"{v:.1f} s")])
    return rows


_GROUP_HEADER = ["settings", "runs", "seeds", "metric", "baseline", "parameters", "FLOPs", "ORT ms",
                 "edges changed", "wall"]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """An aligned plain-text table for a terminal."""
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def compare_runs(directories: list[str | Path], *, latency: bool = True, batch: int | None = None
                 ) -> tuple[list[Run], dict[str, tuple[list[str], list[list[str]]]]]:
    """Load the runs and build the tables: ``{"runs": (header, rows), "groups": (header, rows)}``
    (``groups`` only when some settings were run with two or more seeds)."""
    if not directories:
        raise UserInputError("archir compare needs at least one run directory")
    runs = [load_run(d) for d in directories]
    if latency:
        measure_latencies(runs, batch)
    tables = {"runs": (_HEADER, [_row(r) for r in runs])}
    grouped = group_rows(runs)
    if grouped:
        tables["groups"] = (_GROUP_HEADER, grouped)
    return runs, tables


def render(tables: dict[str, tuple[list[str], list[list[str]]]], fmt: str = "text") -> str:
    """The tables as text (``fmt="text"``) or Markdown (``"markdown"``), runs first."""
    draw = text_table if fmt == "text" else markdown
    parts = [draw(*tables["runs"])]
    if "groups" in tables:
        parts.append("Mean ± std over seeds:")
        parts.append(draw(*tables["groups"]))
    return "\n\n".join(parts) + "\n"
