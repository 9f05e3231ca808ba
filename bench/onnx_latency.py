"""Latency of PyTorch eager vs ONNX Runtime, per model and batch size.

For each case (name, module, example input) the module is exported with
``archir.backends.onnx_export.export_onnx`` (verified against PyTorch first; a model that fails
verification is reported and not timed), then timed at each batch size: ``warmup`` untimed calls,
then the **median** (and min) of ``runs`` timed calls. PyTorch runs in eval mode under
``torch.inference_mode()``; thread counts are left at their defaults (recorded in the JSON). Note
that ONNX Runtime's default thread count is the machine's core count even under ``taskset``: to
emulate a smaller machine pin the process *and* pass ``--ort-threads``.
``speedup = torch_ms / ort_ms`` (> 1: ONNX Runtime is faster).

With ``--device cpu`` (default) both run on the CPU, ONNX Runtime with the CPU provider only. With
``--device cuda`` PyTorch runs on the GPU (synchronised) and ONNX Runtime uses
``ort_session``'s providers with inputs and outputs bound on the GPU (I/O binding), so neither side
pays host/device copies.

Models are pluggable:

* by default **original vs slim** for ResNet20 and MBConv (:func:`slim_cases`): the original is the
  example's own module; the slim one is what a search method (``--method``, default DNAT with
  ``share=full``; ``--method-option`` for others) derives from it with fixed, seeded decisions
  (``s = archir.search(model, x, method, **options)``, every architecture parameter set to
  ``torch.rand`` of its shape from ``--slim-seed`` (DNAT: θ = ``torch.rand(3)``), the method's own
  step after an update (DNAT: θ ≥ 0), then ``s.derive()`` (DNAT: argmax, prune, fold identities):
  the same random-θ derivation as ``tests/test_dnat_passes.py``), so some edges become none
  (pruned) and some identity. No training: the weights are the initial ones, which does not change
  latency.
  The JSON's ``summary`` gives, per model and batch size, ORT vs torch eager for each variant
  and slim / original for each runtime;
* ``--all-examples``: every ``examples/*.py`` that defines ``build_model()`` and ``example_input()``;
* ``--models package.module:function`` (repeatable): ``function()`` returns an iterable of
  :class:`BenchCase` or ``(name, module, example_input)`` tuples;
* from Python: ``benchmark([BenchCase("resnet20", m, x, group="resnet20", variant="original"),
  BenchCase("resnet20-slim", s, x, group="resnet20", variant="slim")])``. Cases sharing a
  ``group`` are compared with the group's first case (``vs_first`` ratios in the JSON), which is
  how "original vs slim" pairs are reported.

Run: ``python bench/onnx_latency.py [--runs 30] [--batch-sizes 1 64] [--ort-threads 2] [--torch-threads 2]
[--output PATH]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from archir.backends.onnx_export import OnnxVerificationError, export_onnx, ort_session
from archir.fileio import write_text

try:
    from bench.method_args import add_method_arguments, method_options
except ImportError:  # run as a script: bench/ is on sys.path
    from method_args import add_method_arguments, method_options

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "examples"
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "onnx_latency.json"


@dataclasses.dataclass
class BenchCase:
    name: str
    module: nn.Module
    example_input: torch.Tensor
    group: str | None = None
    variant: str | None = None
    info: dict[str, Any] | None = None  # extra facts copied into the JSON entry (e.g. how it was derived)


def as_case(item: BenchCase | tuple) -> BenchCase:
    if isinstance(item, tuple):
        return BenchCase(*item)
    # duck-typed: this file may be loaded twice (as __main__ and as bench.onnx_latency)
    return BenchCase(**{f.name: getattr(item, f.name, f.default) for f in dataclasses.fields(BenchCase)})


def example_cases(examples_dir: Path = EXAMPLES_DIR, seed: int = 0) -> list[BenchCase]:
    """One case per ``examples/*.py`` defining ``build_model()`` and ``example_input()``."""
    cases = []
    for path in sorted(Path(examples_dir).glob("*.py")):
        if path.name.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"archir_bench_example_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not (callable(getattr(module, "build_model", None)) and callable(getattr(module, "example_input", None))):
            continue
        torch.manual_seed(seed)
        cases.append(BenchCase(path.stem, module.build_model(), module.example_input(), group=path.stem,
                               variant="original"))
    return cases


def _load_example(name: str, examples_dir: Path = EXAMPLES_DIR):
    spec = importlib.util.spec_from_file_location(f"archir_bench_example_{name}", Path(examples_dir) / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _choice_order(lists: Iterable[Iterable[str]]) -> list[str]:
    """Every choice name of ``lists`` once, keeping the order each list gives them (DNAT: none,
    identity, same)."""
    order: list[str] = []
    for names in lists:
        names = list(names)
        for i, c in enumerate(names):
            if c in order:
                continue
            later = next((order.index(n) for n in names[i + 1:] if n in order), len(order))
            order.insert(later, c)
    return order


def derive_slim(model: nn.Module, example: torch.Tensor, seed: int = 0, method: str = "dnat",
                **options) -> tuple[nn.Module, dict[str, Any]]:
    """``model`` through ``archir.search(model, example, method, **options)`` (default DNAT,
    ``share=full``) with seeded random architecture parameters (no training), derived: the slim
    module and what was decided (count of each choice, parameter and FLOP ratios)."""
    import archir

    if method == "dnat" and not options:
        options = {"share": "full"}
    search = archir.search(model, example, method, **options)
    flops, params = search.original.total_flops(), search.original.total_params()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for theta in search.arch_parameters():
            theta.copy_(torch.rand(theta.shape, generator=generator))
    search.after_arch_step()  # what follows every architecture step (DNAT: θ ≥ 0)
    slim = search.derive(in_place=True)
    graph = search.derived_graph
    decided = [labels["decision"] for labels in search.recorded_decisions.values()]
    names = _choice_order(labels["choices"].split(",") for labels in search.recorded_decisions.values())
    opts = ", ".join(f"{k}={v}" for k, v in options.items())
    what = "random theta" if method == "dnat" else f"{method}, random architecture parameters"
    info = {"derivation": f"{what}, seed {seed}{', ' + opts if opts else ''}, argmax",
            "decisions": {c: decided.count(c) for c in names},
            "flops_ratio": graph.total_flops() / flops, "params_ratio": graph.total_params() / params}
    return slim.eval(), info


SLIM_MODELS = ("resnet20", "mbconv")


def slim_cases(names: Iterable[str] = SLIM_MODELS, seed: int = 0, method: str = "dnat",
               **options) -> list[BenchCase]:
    """Per example: the original module and the slim one :func:`derive_slim` makes (one group each)."""
    cases = []
    for name in names:
        example = _load_example(name)
        torch.manual_seed(0)
        model = example.build_model().eval()
        x = example.example_input()
        slim, info = derive_slim(model, x, seed, method, **options)
        cases.append(BenchCase(name, model, x, group=name, variant="original"))
        cases.append(BenchCase(f"{name}-slim", slim, x, group=name, variant="slim", info=info))
    return cases


def fallback_cases() -> list[BenchCase]:
    """A small ResNet-like model, for when there are no examples."""

    def block(c):
        return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())

    model = nn.Sequential(block(3), nn.Conv2d(3, 16, 3, 2, 1), block(16), block(16),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return [BenchCase("tiny_resnet_like", model, torch.randn(2, 3, 32, 32))]


def load_cases(spec: str) -> list[BenchCase]:
    """``package.module:function`` -> the cases ``function()`` returns."""
    module_name, _, attr = spec.partition(":")
    fn: Callable[[], Iterable] = getattr(importlib.import_module(module_name), attr or "cases")
    return [as_case(c) for c in fn()]


def _batch_input(example: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    shape = (batch, *example.shape[1:])
    if example.dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(example.dtype)
    return example[torch.randint(0, example.shape[0], (batch,), generator=generator)]


def _time(fn: Callable[[], Any], warmup: int, runs: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times)}


def _torch_runner(module: nn.Module, x: torch.Tensor, device: str) -> Callable[[], Any]:
    x = x.to(device)

    def run():
        with torch.inference_mode():
            out = module(x)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def _ort_runner(session, x: np.ndarray, device: str) -> Callable[[], Any]:
    input_name = session.get_inputs()[0].name
    if device == "cuda" and "CUDAExecutionProvider" in session.get_providers():
        import onnxruntime as ort

        binding = session.io_binding()
        binding.bind_ortvalue_input(input_name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        for out in session.get_outputs():
            binding.bind_output(out.name, "cuda")
        return lambda: session.run_with_iobinding(binding)
    return lambda: session.run(None, {input_name: x})


def bench_case(case: BenchCase, onnx_dir: Path, batch_sizes: Iterable[int], warmup: int, runs: int,
               device: str, seed: int, ort_threads: int | None = None) -> dict[str, Any]:
    module = case.module.eval().to(device)
    example = case.example_input.to(device)
    entry: dict[str, Any] = {
        "name": case.name, "group": case.group, "variant": case.variant,
        "params": sum(p.numel() for p in module.parameters()),
        "input_shape": list(case.example_input.shape[1:]),
        **({"derived": case.info} if case.info else {}),
    }
    path = onnx_dir / f"{case.name}.onnx"
    try:
        report = export_onnx(module, example, path)
    except OnnxVerificationError as exc:
        entry["error"] = str(exc)
        return entry
    entry["onnx"] = {
        "exporter": report.exporter, "opset": report.opset, "num_nodes": report.num_nodes,
        "op_counts": report.op_counts, "max_abs_err": max(e.max_abs_err for e in report.errors),
        "removed_identity": report.removed_identity, "removed_dead": report.removed_dead,
    }
    providers = ["CPUExecutionProvider"] if device == "cpu" else None
    session = ort_session(path, providers, intra_op_num_threads=ort_threads)
    entry["ort_providers"] = session.get_providers()
    generator = torch.Generator().manual_seed(seed)
    entry["results"] = {}
    for batch in batch_sizes:
        x = _batch_input(case.example_input, batch, generator)
        t_torch = _time(_torch_runner(module, x, device), warmup, runs)
        t_ort = _time(_ort_runner(session, x.numpy(), device), warmup, runs)
        entry["results"][str(batch)] = {
            "torch_ms": t_torch["median_ms"], "torch_min_ms": t_torch["min_ms"],
            "ort_ms": t_ort["median_ms"], "ort_min_ms": t_ort["min_ms"],
            "speedup": t_torch["median_ms"] / t_ort["median_ms"],
        }
    return entry


def _group_ratios(entries: list[dict[str, Any]]) -> None:
    """Within each group, latency of every case relative to the group's first (e.g. slim/original)."""
    first: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if entry.get("group") is None or "results" not in entry:
            continue
        base = first.setdefault(entry["group"], entry)
        if base is entry:
            continue
        entry["vs_first"] = {
            batch: {"reference": base["name"],
                    "torch_ratio": r["torch_ms"] / base["results"][batch]["torch_ms"],
                    "ort_ratio": r["ort_ms"] / base["results"][batch]["ort_ms"]}
            for batch, r in entry["results"].items() if batch in base["results"]
        }


def _summary(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per group and batch size: ORT vs torch eager for each variant, and each variant vs the first."""
    out: dict[str, Any] = {}
    for entry in entries:
        if "results" not in entry:
            continue
        group = out.setdefault(entry.get("group") or entry["name"], {})
        variant = entry.get("variant") or entry["name"]
        for batch, r in entry["results"].items():
            row = group.setdefault(f"batch {batch}", {})
            row[f"{variant}: torch_ms / ort_ms"] = round(r["speedup"], 3)
            if "vs_first" in entry and batch in entry["vs_first"]:
                vs = entry["vs_first"][batch]
                ref = next(e.get("variant") or e["name"] for e in entries if e["name"] == vs["reference"])
                row[f"torch: {variant} / {ref}"] = round(vs["torch_ratio"], 3)
                row[f"ort: {variant} / {ref}"] = round(vs["ort_ratio"], 3)
    return out


def benchmark(cases: Iterable[BenchCase | tuple], *, batch_sizes: Iterable[int] = (1, 64), warmup: int = 5,
              runs: int = 30, device: str = "cpu", output: str | os.PathLike | None = DEFAULT_OUTPUT,
              onnx_dir: str | os.PathLike | None = None, seed: int = 0, ort_threads: int | None = None,
              verbose: bool = True) -> dict[str, Any]:
    """Time every case; write the JSON to ``output`` (atomically) unless it is None; return it."""
    import onnxruntime

    batch_sizes = list(batch_sizes)
    result: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": device,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "torch_threads": torch.get_num_threads(), "ort_threads": ort_threads or "default",
            "warmup": warmup, "runs": runs, "statistic": "median",
            # other processes on a small machine wreck torch's OpenMP timings: check these
            "loadavg_start": _loadavg(), "loadavg_end": None,
            "speedup": "torch_ms / ort_ms",
        },
        "models": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(onnx_dir) if onnx_dir is not None else Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        for case in map(as_case, cases):
            entry = bench_case(case, directory, batch_sizes, warmup, runs, device, seed, ort_threads)
            result["models"].append(entry)
            if verbose:
                print(_format(entry), flush=True)
    result["meta"]["loadavg_end"] = _loadavg()
    _group_ratios(result["models"])
    result["summary"] = _summary(result["models"])
    if output is not None:
        _write_json(result, Path(output))
    return result


def _write_json(result: dict[str, Any], output: Path) -> None:
    write_text(output, json.dumps(result, indent=2) + "\n")


def _loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _format(entry: dict[str, Any]) -> str:
    if "error" in entry:
        return f"{entry['name']:<20} NOT TIMED: {entry['error']}"
    cells = [f"b{b}: torch {r['torch_ms']:7.2f} ms  ort {r['ort_ms']:7.2f} ms  x{r['speedup']:.2f}"
             for b, r in entry["results"].items()]
    return f"{entry['name']:<20} " + "  |  ".join(cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", action="append", default=[], metavar="MODULE:FUNCTION",
                        help="callable returning cases; repeatable (default: examples/*.py)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    parser.add_argument("--keep-onnx", metavar="DIR", help="keep the exported models here")
    parser.add_argument("--ort-threads", type=int, help="ONNX Runtime intra-op threads (default: ORT's own "
                        "choice, which counts the machine's cores and ignores taskset/affinity)")
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--all-examples", action="store_true",
                        help="time every examples/*.py (originals only) instead of original vs slim")
    parser.add_argument("--slim-seed", type=int, default=0, help="seed of the slim models' random θ")
    parser.add_argument("--note", help="free text stored in the JSON's meta (e.g. how the machine was loaded)")
    add_method_arguments(parser)
    args = parser.parse_args(argv)
    options = method_options(parser, args, defaults={"share": "full"})

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.models:
        sys.path.insert(0, os.getcwd())
        cases = [c for spec in args.models for c in load_cases(spec)]
    elif args.all_examples:
        cases = example_cases() or fallback_cases()
    else:
        cases = slim_cases(seed=args.slim_seed, method=args.method, **options)
    result = benchmark(cases, batch_sizes=args.batch_sizes, warmup=args.warmup, runs=args.runs,
                       device=args.device, output=None, onnx_dir=args.keep_onnx, ort_threads=args.ort_threads)
    if args.note:
        result["meta"]["note"] = args.note
    _write_json(result, Path(args.output))
    for group, rows in result["summary"].items():
        for batch, row in rows.items():
            print(f"{group:<10} {batch:<9} " + "  ".join(f"{k} {v:.2f}" for k, v in row.items()))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
