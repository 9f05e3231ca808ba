"""Preflight: everything ``archir transform`` can check before the first training step.

A run is hours long on a GPU; a mistake found after an epoch (an unwritable ``--out``, a full
disk, ``--device cuda`` without CUDA, two options that contradict each other) costs that epoch.
Each check here raises one :class:`~archir.errors.UserInputError` naming what is wrong, where,
and what to do; the CLI prints it on one line and exits with code 2. The data checks (classes
against the model's outputs, one forward pass, the loss and the metric on a real batch) are
:func:`archir.task.check_task` / :func:`archir.task.check_labels`, which the pipeline runs on the
first training batch before any step (:func:`check_first_batch`).

Room for the outputs: with ``P`` the parameters of the model written at the end and ``S`` those
of the supernet (both 4-byte floats), a run writes ``weights.pt`` and ``model.onnx`` (``4P`` bytes
each), and ``checkpoint.pt``: the model trained in that epoch and its SGD momentum (``2 * 4S``),
in the network stage also the supernet as it was at the derive (``4S``); while a checkpoint is
replaced the old and the new one exist side by side. So a run needs at most
``4 * (2P + 2 * 3S) + 8 MiB`` (pictures, reports, the emitted code) free, which
:func:`required_bytes` returns and :func:`check_room` compares with ``shutil.disk_usage``.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserInputError

_SMALL_FILES = 8 << 20  # graph.svg, arch.png, report.*, model.py


def check_device(spec: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a device, or one clear error when it is not
    there (``cuda`` without CUDA, ``cuda:3`` on a machine with 2 GPUs)."""
    spec = str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise UserInputError(f"--device {spec!r} is not a device; use auto, cpu or cuda") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"--device {spec}: CUDA is not available on this machine (torch "
                                 f"{torch.__version__}); use --device cpu or --device auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserInputError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA "
                                 f"device(s) (0..{torch.cuda.device_count() - 1})")
    return dev


def check_epochs(options: dict[str, Any], explicit: set[str]) -> None:
    """``--arch-epochs`` given explicitly must be at most ``--epochs``: a silent clamp would run
    another schedule than the one asked for (a recipe's or the default architecture stage is cut
    to ``--epochs`` instead, and the report says so under ``effective``). ``--epochs 0`` trains
    nothing whatever the stages say (a quick check of the pipeline)."""
    if ("arch_epochs" in explicit and "epochs" in options and options["epochs"] > 0
            and options["arch_epochs"] > options["epochs"]):
        raise UserInputError(f"--arch-epochs ({options['arch_epochs']}) must be at most --epochs "
                             f"({options['epochs']}): --epochs counts both stages")


def required_bytes(final: nn.Module, supernet: nn.Module | None = None) -> int:
    """Free bytes a run needs for its outputs (see the module docstring for the formula)."""
    def size(m: nn.Module | None) -> int:
        if m is None:
            return 0
        seen = {id(p): p for p in m.parameters()}
        seen.update({id(b): b for b in m.buffers()})
        return sum(t.numel() * t.element_size() for t in seen.values())

    p = size(final)
    s = max(size(supernet), p)
    return 2 * p + 2 * 3 * s + _SMALL_FILES


def check_writable(directory: Path, what: str | None = None) -> None:
    """Create ``directory`` (and its parents) and write and delete a probe file in it; ``what``
    names it in the error (default ``--out DIRECTORY``)."""
    what = what or f"--out {directory}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".archir-probe.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserInputError(f"{what} is not writable ({exc.strerror or exc}); choose a directory you can "
                             "write to") from exc


def check_room(directory: Path, needed: int, what: str | None = None) -> None:
    """At least ``needed`` bytes free on the file system of ``directory``."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise UserInputError(f"{what or '--out ' + str(directory)}: {_mib(free)} free, this run needs about "
                             f"{_mib(needed)} for its outputs and checkpoints; free some space or choose another "
                             "--out")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def check_opset(opset: int | None) -> None:
    """An ONNX opset the installed ``onnx`` package knows and the exporters can write (7 to the
    newest ``onnx.defs.onnx_opset_version()``)."""
    if opset is None:
        return
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not 7 <= opset <= newest:
        raise UserInputError(f"--opset {opset} is not one archir can export: choose 7..{newest} (the installed "
                             f"onnx {onnx.__version__} knows up to {newest}; the exporter's default is best)")


def check_finite(value: float, flag: str) -> None:
    """A finite, non-negative number (learning rates, tolerances)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise UserInputError(f"{flag} must be a finite number >= 0, not {value}")
