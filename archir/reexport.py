"""``archir export DIR``: export the model of a transform's output directory to ONNX and verify it.

DIR holds what :func:`archir.transform` wrote: ``model.py`` + ``weights.pt`` (the standalone slim
module, see ``archir.backends.standalone``) and ``report.json``, whose ``example_inputs`` (shape and
dtype of each example input) say what to export with. The model is rebuilt from ``model.py``'s
``build_model()``, its weights loaded with ``torch.load(weights_only=True)`` (strict), and handed to
:func:`archir.backends.onnx_export.export_onnx` (checker, Identity/dead-node cleanup, ONNX Runtime
parity at the example's batch size and, with a dynamic batch axis, at batch + 3).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserInputError
from .preflight import check_finite, check_opset
from .task import describe

REQUIRED_FILES = ("model.py", "weights.pt", "report.json")


@dataclass
class OutputDir:
    """A transform's output directory, loaded: the rebuilt module, example inputs, the report."""

    path: Path
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    report: dict[str, Any]


def _import_model_py(path: Path):
    from .model_file import import_file

    return import_file(path, "archir_emitted")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise UserInputError(f"report.json: unknown dtype {name!r} in example_inputs")
    return dtype


def example_inputs_from_report(report: dict[str, Any], input_shape: tuple[int, ...] | None = None,
                               seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded random inputs of the shapes and dtypes recorded in ``report["example_inputs"]``
    (``input_shape`` replaces them with one float32 input of that shape)."""
    if input_shape is not None:
        specs = [{"shape": list(input_shape), "dtype": "float32"}]
    else:
        specs = report.get("example_inputs")
        if not specs:
            raise UserInputError("report.json records no example_inputs (it was written by an older archir); "
                                 "pass --input-shape, e.g. --input-shape 1,3,32,32")
    generator = torch.Generator().manual_seed(seed)
    return tuple(_random_input(spec, generator) for spec in specs)


def input_spec(value: Any) -> Any:
    """What report.json records of one example input (see :func:`example_inputs_from_report`): a
    tensor's shape and dtype (integers: their range too), ``{"list": [...]}``,
    ``{"tuple": [...]}`` or ``{"dict": {...}}`` for a container argument."""
    if isinstance(value, torch.Tensor):
        spec = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
        if not (value.is_floating_point() or value.is_complex()) and value.numel():
            spec.update(min=int(value.min()), max=int(value.max()))  # token ids keep their range
        return spec
    if isinstance(value, dict):
        return {"dict": {str(k): input_spec(v) for k, v in value.items()}}
    return {type(value).__name__ if type(value) in (list, tuple) else "tuple": [input_spec(v) for v in value]}


def _random_input(spec: Any, generator: torch.Generator) -> Any:
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("list", "tuple", "dict"):
        kind, items = next(iter(spec.items()))
        if kind == "dict" and isinstance(items, dict):
            return {k: _random_input(v, generator) for k, v in items.items()}
        if kind != "dict" and isinstance(items, list):
            made = [_random_input(v, generator) for v in items]
            return made if kind == "list" else tuple(made)
        raise UserInputError(f"report.json: bad example_inputs entry {spec!r}")
    try:
        shape = tuple(int(d) for d in spec["shape"])
    except (KeyError, TypeError, ValueError):
        raise UserInputError(f"report.json: bad example_inputs entry {spec!r}") from None
    dtype = _dtype(spec.get("dtype", "float32"))
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=generator).to(dtype)
    lo, hi = int(spec.get("min", 0)), int(spec.get("max", 0))
    return torch.randint(lo, hi + 1, shape, generator=generator).to(dtype)


def load_output_dir(directory: str | Path, input_shape: tuple[int, ...] | None = None) -> OutputDir:
    """Rebuild the slim module of a transform's output directory, with its weights and example inputs.
    Anything missing or unusable raises :class:`archir.UserInputError` with one clear line."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise UserInputError(f"output directory not found: {d}")
    missing = [n for n in REQUIRED_FILES if not (d / n).is_file()]
    if missing:
        raise UserInputError(f"{d} is not an archir transform output directory: {', '.join(missing)} missing")
    try:
        report = json.loads((d / "report.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"cannot read {d / 'report.json'}: {exc}") from exc
    if not isinstance(report, dict):
        raise UserInputError(f"{d / 'report.json'} is not a transform report")

    module_py = _import_model_py(d / "model.py")
    build = getattr(module_py, "build_model", None)
    if not callable(build):
        raise UserInputError(f"{d / 'model.py'} defines no build_model()")
    try:
        model = build()
    except Exception as exc:  # noqa: BLE001
        raise UserInputError(f"{d / 'model.py'}: build_model() failed: {type(exc).__name__}: {exc}") from exc
    try:
        state = torch.load(d / "weights.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserInputError(f"cannot read {d / 'weights.pt'} as a state_dict: {type(exc).__name__}: {first}") \
            from exc
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = " ".join(str(exc).strip().splitlines()[:3])[:400]
        raise UserInputError(f"{d / 'weights.pt'} does not fit {d / 'model.py'}: {first}") from exc
    inputs = example_inputs_from_report(report, input_shape)
    return OutputDir(d, model.eval(), inputs, report)


def export_output_dir(directory: str | Path, onnx_path: str | Path | None = None, *, opset: int | None = None,
                      rtol: float = 1e-4, atol: float = 1e-5, dynamic_batch: bool = True,
                      input_shape: tuple[int, ...] | None = None):
    """Export DIR's model to ``onnx_path`` (default ``DIR/model.onnx``) and verify it under ONNX
    Runtime; returns the :class:`~archir.backends.onnx_export.OnnxReport`. The options and the
    model's run on the example inputs are checked first; an existing file at ``onnx_path`` is
    replaced only by a verified export. A mismatch raises ``OnnxVerificationError`` (an
    ``ArchirError``) and leaves ``<stem>.unverified.onnx``."""
    from archir.backends import onnx_export

    loaded = load_output_dir(directory, input_shape)
    path = Path(onnx_path).expanduser() if onnx_path is not None else loaded.path / "model.onnx"
    if path.is_dir():
        raise UserInputError(f"--onnx {path} is a directory; give a file name such as {path / 'model.onnx'}")
    check_finite(rtol, "--rtol")
    check_finite(atol, "--atol")
    check_opset(opset)
    try:  # the model must take the example inputs (--input-shape may not fit it)
        with torch.no_grad():
            loaded.module(*loaded.example_inputs)
    except Exception as exc:  # noqa: BLE001 - user data: one line
        shapes = ", ".join(describe(x) for x in loaded.example_inputs)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        hint = "--input-shape" if input_shape is not None else "report.json's example_inputs"
        raise UserInputError(f"the model in {loaded.path} cannot take the inputs {shapes} (from {hint}): "
                             f"{type(exc).__name__}: {first}") from exc
    return onnx_export.export_onnx(loaded.module, loaded.example_inputs, path, opset=opset,
                                   dynamic_batch=dynamic_batch, rtol=rtol, atol=atol)


def summary_line(report) -> str:
    """One line: file, nodes, opset, exporter, worst error and the batch sizes checked."""
    worst = max((e.max_abs_err for e in report.errors), default=float("nan"))
    batches = "/".join(str(b) for b in sorted({e.batch for e in report.errors}))
    return (f"wrote {report.path}: {report.num_nodes} nodes, opset {report.opset} ({report.exporter} exporter), "
            f"{'dynamic' if report.dynamic_batch else 'static'} batch; ONNX Runtime "
            f"({', '.join(report.providers)}) matches PyTorch at batch {batches}: max abs error {worst:.2g} "
            f"(atol={report.atol:g}, rtol={report.rtol:g})")
