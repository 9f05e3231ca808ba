"""ONNX backend: export a PyTorch module, clean the graph, check it, and verify it under ONNX Runtime.

Pipeline (one straight function, :func:`export_onnx`, of named stages):

1. **export** the module (put in eval mode; each submodule's previous mode is restored afterwards)
   into a private temporary folder next to the destination;
2. **check** the exporter's model with ``onnx.checker.check_model(full_check=True)``;
3. **clean**: remove ``Identity`` nodes and dead nodes (:func:`clean_graph`), keeping graph input
   and output names, then **re-check**;
4. **save** a candidate into that temporary folder and check the saved file again;
5. **verify** (``verify=True``): run ONNX Runtime on the candidate with seeded random inputs at the
   example's batch size ``B`` and, with ``dynamic_batch``, at ``B + 3`` (drawn by
   :func:`_random_like`; inputs that share no batch axis, :func:`common_batch`, at their own
   shapes); compare every output with the eval-mode PyTorch module. An output passes
   when its largest error is small next to its largest value (see :func:`_compare`):

       max_i |onnx_i - torch_i| <= atol + rtol * max_i |torch_i|
   An output that fails this gets a second opinion from PyTorch in float64
   (:func:`_float64_verdict`): it passes when ONNX Runtime is at most ``FLOAT64_FACTOR`` times
   as far from the float64 result as PyTorch's own float32 runs are (an ill-conditioned network,
   e.g. random weights with activations in the thousands, where float32 itself is inexact);
   and outputs that are the rows of a ranked set (a detector's detections) pass where ONNX
   Runtime gives PyTorch's rows in another order among near-tied scores (:mod:`.onnx_rows`);

6. **replace**: only a verified candidate is moved to ``path`` with ``os.replace`` (atomic on
   POSIX: a reader sees the old model or the new one, never half of one). On a mismatch the
   candidate is written to ``<stem>.unverified.onnx`` (kept for inspection) and
   :class:`OnnxVerificationError` names the worst output, its max abs/rel error and the
   tolerances; a failure or an interruption at any stage leaves an earlier file at ``path`` as it
   was.

Exporter choice
---------------
Both torch exporters were measured with torch 2.14.1 / onnxscript 0.7 on plain ``nn.Module``\\ s and
``torch.fx.symbolic_trace``'d ``GraphModule``\\ s (conv/bn/relu, residual, tuple and dict outputs):

* the **dynamo exporter** (``torch.onnx.export(..., dynamo=True)``, torch.export + onnxscript,
  the default since torch 2.9) handled both kinds of module, and its built-in onnxscript optimizer
  gives clean graphs: ``x.view(x.shape)`` and ``nn.Identity`` vanish, no ``Shape/Gather/Concat``
  chains for ``view(x.size(0), -1)``, no ``Constant`` nodes (weights are initializers). A named
  ``torch.export.Dim("batch")`` gives a symbolic ``batch`` axis on every input and output, and it
  works even from a batch-1 example (no 0/1 specialisation in torch 2.14). Cost: ~1.5 s per small
  model (~5 s for the first export in a process).
* the **TorchScript exporter** (``dynamo=False``) is faster (~0.05 s) but emits a
  ``DeprecationWarning`` in 2.14 (it is slated for removal), leaves ``Identity`` and
  ``Shape/Gather/Unsqueeze/Concat`` chains for shape arithmetic, and names values ``/Constant_output_0``.

So ``exporter="auto"`` (the default) uses the dynamo exporter and falls back to the TorchScript
exporter only when torch.export cannot capture the module (data-dependent control flow, say) or
the model it writes fails ``onnx.checker`` (its optimiser left a node reading a value nothing
produces: timm's Gemma ViT); the reason is recorded in :attr:`OnnxReport.notes`. ``exporter="dynamo"`` / ``"torchscript"`` force one.

Identity nodes that remain
--------------------------
An ``Identity`` is removed when that can be done without renaming a graph input or output: its
consumers are rewired to its input, or, when it feeds a graph output, its producer's output is
renamed to the graph-output name. It is *kept* (and counted in ``kept_identity``) only when the
model returns a graph input or an initializer unchanged, or returns the same tensor under two
names: ONNX has no other way to give one value two names.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from onnx import external_data_helper

from archir.errors import ArchirError, UserInputError
from archir.fileio import _umask, atomic_path
from archir.modes import eval_mode
from archir.task import argument_names

__all__ = [
    "OnnxReport",
    "OutputError",
    "OnnxVerificationError",
    "OnnxExportError",
    "check_onnx_exportable",
    "CleanupStats",
    "export_onnx",
    "clean_graph",
    "count_nodes",
    "ort_session",
    "ort_providers",
    "flatten_outputs",
]

# Models whose weights exceed this are saved with external data (protobuf's hard limit is 2 GiB).
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000
_INLINE_TENSOR_BYTES = 1024  # smaller tensors held in the proto stay in the .onnx file, as onnx.save_model keeps them
_BATCH_EXTRA = 3  # the second verification batch size is B + 3
#: an output that fails the float32 comparison passes when ONNX Runtime's error against PyTorch in
#: float64 is at most this many times PyTorch float32's own (see :func:`_float64_verdict`)
FLOAT64_FACTOR = 2.0


class OnnxExportError(ArchirError):
    """The module holds something ONNX cannot express; raised before anything is exported."""


def check_onnx_exportable(module: nn.Module) -> None:
    """Raise :class:`OnnxExportError` (one line, naming the submodule and what to do) for what
    the exporter is known to get wrong, before any file is written; quick, runs nothing.

    * ``nn.LSTM`` with ``proj_size > 0``: ONNX's ``LSTM`` operator has no projection, and the
      dynamo exporter (torch 2.14 / onnxscript 0.7) still maps it there, writing a model whose
      ``initial_c`` has the projected size, which ONNX Runtime refuses to run (the TorchScript
      exporter refuses LSTMs with projections outright).

    Other recurrent layers (``nn.RNN``, ``nn.GRU``, ``nn.LSTM`` without projection, several
    layers, bidirectional) export to ONNX's ``RNN``/``GRU``/``LSTM`` operators and verify.
    """
    for path, m in module.named_modules():
        if isinstance(m, nn.LSTM) and m.proj_size > 0:
            raise OnnxExportError(
                f"cannot export to ONNX: nn.LSTM '{path or type(module).__name__}' has proj_size={m.proj_size}, "
                "which ONNX's LSTM operator cannot express; skip the ONNX model (--no-onnx, or onnx=False) "
                "or use an LSTM without proj_size")


class OnnxVerificationError(ArchirError, AssertionError):
    """ONNX Runtime's outputs do not match PyTorch's within tolerance.

    An :class:`archir.ArchirError` (the CLI prints its one-line message and exits with code 2) and,
    for callers that treat it as a failed check, an ``AssertionError``.

    ``report`` holds the full :class:`OnnxReport` (``passed=False``, ``path`` pointing at the kept
    ``*.unverified.onnx``).
    """

    def __init__(self, message: str, report: "OnnxReport | None" = None):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass
class OutputError:
    """Error of one output at one batch size (see :func:`_compare` for the maths).

    ``max_abs_err`` is ``max_i |d_i|``; ``ref_scale`` is ``max_i |ref_i|`` over the reference's
    finite elements; ``max_rel_err`` is the error relative to that scale, ``max_abs_err /
    ref_scale`` (the quantity ``rtol`` bounds; not the largest elementwise ratio ``|d_i| / |ref_i|``,
    which is unbounded at elements near zero); ``worst_excess`` is ``max_abs_err - (atol + rtol *
    ref_scale)``, > 0 exactly when the output fails."""

    name: str
    batch: int | None  # None: inputs that share no batch axis, at the example's shapes
    shape: list[int]
    max_abs_err: float
    max_rel_err: float
    worst_excess: float
    passed: bool
    detail: str = ""
    ref_scale: float = 0.0
    #: where the float32 check failed: the largest errors of ONNX Runtime and of PyTorch's own
    #: float32 run against PyTorch in float64 (see :func:`_float64_verdict`); None otherwise
    float64_onnx_err: float | None = None
    float64_torch_err: float | None = None


@dataclasses.dataclass
class CleanupStats:
    removed_identity: int = 0
    removed_dead: int = 0
    removed_initializers: int = 0
    kept_identity: int = 0

    @property
    def modified(self) -> bool:
        return bool(self.removed_identity or self.removed_dead or self.removed_initializers)


@dataclasses.dataclass
class OnnxReport:
    path: str
    opset: int
    exporter: str
    num_nodes: int
    op_counts: dict[str, int]
    input_names: list[str]  # each tensor of the arguments, in call order (those unread included)
    output_names: list[str]
    dynamic_batch: bool
    unread_inputs: list[str] = dataclasses.field(default_factory=list)  # not inputs of the ONNX model
    removed_identity: int = 0
    removed_dead: int = 0
    removed_initializers: int = 0
    kept_identity: int = 0
    errors: list[OutputError] = dataclasses.field(default_factory=list)
    providers: list[str] = dataclasses.field(default_factory=list)
    rtol: float = 1e-4
    atol: float = 1e-5
    verified: bool = False
    passed: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as a plain dict (``dataclasses.asdict``: each :class:`OutputError` becomes a dict too)."""
        return dataclasses.asdict(self)

    def worst(self) -> OutputError | None:
        """The output (at some batch size) that is furthest outside tolerance, or closest to it."""
        return max(self.errors, key=lambda e: (e.worst_excess, e.max_abs_err), default=None)


# --------------------------------------------------------------------------------------------------
# ONNX Runtime


def ort_providers() -> list[str]:
    """CUDA only when torch sees a GPU *and* this onnxruntime build has the CUDA provider; otherwise
    the CPU provider alone (asking onnxruntime-gpu for CUDA on a machine without one prints a
    warning and falls back anyway)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if torch.cuda.is_available() and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_session(path: str | os.PathLike, providers: Sequence[str] | None = None, *,
                intra_op_num_threads: int | None = None, spinning: bool = True):
    """An ``onnxruntime.InferenceSession`` for ``path`` with :func:`ort_providers` (or ``providers``)
    and ORT's own log output limited to errors (``log_severity_level=3``). ``spinning=False``: the
    session's threads sleep instead of spinning after a run; for timing several sessions
    interleaved, where one session's spinning threads would steal the cores of the next.

    ``session.get_providers()`` says which providers were really used (CUDA may fail to load)."""
    import onnxruntime as ort

    providers = list(providers) if providers is not None else ort_providers()
    if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
        # onnxruntime-gpu finds CUDA/cuDNN from the nvidia-* wheels torch installed only if preloaded.
        with contextlib.suppress(Exception):
            ort.preload_dlls()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if intra_op_num_threads is not None:
        options.intra_op_num_threads = intra_op_num_threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


# --------------------------------------------------------------------------------------------------
# Graph inspection and cleanup


def count_nodes(path_or_model: str | os.PathLike | onnx.ModelProto) -> dict[str, int]:
    """``op_type -> count`` over the main graph's nodes (ops of a non-default domain are keyed
    ``domain::op_type``), sorted by op type."""
    model = path_or_model
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(path_or_model), load_external_data=False)
    counts = collections.Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in model.graph.node
    )
    return dict(sorted(counts.items()))


def _subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _outer_names_used(graph: onnx.GraphProto) -> set[str]:
    """Every name a (nested) subgraph reads; an over-approximation of its outer-scope references,
    which is the safe direction for liveness."""
    used: set[str] = set()
    for node in graph.node:
        used.update(i for i in node.input if i)
        for sub in _subgraphs(node):
            used |= _outer_names_used(sub)
    used.update(o.name for o in graph.output)
    return used


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Make every node input (in nested subgraphs too) that reads ``old`` read ``new``."""
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == old:
                node.input[k] = new
        for sub in _subgraphs(node):
            _rename_uses(sub, old, new)
            for out in sub.output:  # a subgraph may return an outer value directly
                if out.name == old:
                    out.name = new


def _remove_identities(graph: onnx.GraphProto, stats: CleanupStats) -> bool:
    graph_inputs = {i.name for i in graph.input}
    initializers = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    changed = False
    kept = 0
    k = 0
    while k < len(graph.node):
        node = graph.node[k]
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or len(node.input) != 1:
            k += 1
            continue
        src, dst = node.input[0], node.output[0]
        graph_outputs = [o.name for o in graph.output]
        if dst not in graph_outputs:
            # dst is internal: its readers read src instead.
            _rename_uses(graph, dst, src)
        elif src in graph_inputs or src in initializers or src in graph_outputs:
            # Renaming src would rename a graph input/initializer/another output: ONNX needs this node.
            kept += 1
            k += 1
            continue
        else:
            # src is an internal value produced by a node: that node now writes dst directly.
            producer = next((n for n in graph.node if src in n.output), None)
            if producer is None:  # src comes from an enclosing scope: cannot rename it here
                kept += 1
                k += 1
                continue
            producer.output[list(producer.output).index(src)] = dst
            _rename_uses(graph, src, dst)
            # the value_info of src describes dst now, unless dst already has one
            vi_names = {v.name for v in graph.value_info}
            for vi in list(graph.value_info):
                if vi.name == src:
                    if dst in vi_names:
                        graph.value_info.remove(vi)
                    else:
                        vi.name = dst
        del graph.node[k]
        for vi in list(graph.value_info):
            if vi.name == dst and dst not in graph_outputs:
                graph.value_info.remove(vi)
        stats.removed_identity += 1
        changed = True
    stats.kept_identity = kept
    return changed


def _remove_dead(graph: onnx.GraphProto, stats: CleanupStats) -> bool:
    """Drop nodes none of whose outputs reaches a graph output, then initializers nobody reads.
    Nodes are in topological order (an ONNX requirement the checker enforces), so one backward
    sweep suffices."""
    needed = {o.name for o in graph.output}
    dead = []
    for k in reversed(range(len(graph.node))):
        node = graph.node[k]
        if any(o in needed for o in node.output if o):
            needed.update(i for i in node.input if i)
            for sub in _subgraphs(node):
                needed |= _outer_names_used(sub)
        else:
            dead.append(k)
    for k in dead:  # descending indices
        del graph.node[k]
    removed = len(dead)
    stats.removed_dead += removed
    graph_inputs = {i.name for i in graph.input}
    dead_inits = [t for t in graph.initializer if t.name not in needed and t.name not in graph_inputs]
    for t in dead_inits:
        graph.initializer.remove(t)
    stats.removed_initializers += len(dead_inits)
    if removed or dead_inits:
        produced = {o for n in graph.node for o in n.output} | graph_inputs
        produced |= {t.name for t in graph.initializer}
        for vi in [v for v in graph.value_info if v.name not in produced]:
            graph.value_info.remove(vi)
    return bool(removed or dead_inits)


def remove_unread_inputs(model: onnx.ModelProto) -> list[str]:
    """Drop the graph inputs no node (nor a nested graph) reads and no output returns, in place;
    return their names. A detector's eval-mode graph reads its images only: the targets it takes
    for training mode would otherwise be inputs that inference has to invent."""
    graph = model.graph
    read = {o.name for o in graph.output}
    for node in graph.node:
        read.update(i for i in node.input if i)
        for sub in _subgraphs(node):
            read |= _outer_names_used(sub)
    unread = [i for i in graph.input if i.name not in read]
    for i in unread:
        graph.input.remove(i)
    return [i.name for i in unread]


def clean_graph(model: onnx.ModelProto) -> CleanupStats:
    """Remove ``Identity`` nodes and dead nodes from the main graph, in place, until stable.

    Graph input and output names never change. An ``Identity`` is kept only when removing it would
    rename a graph input, initializer or another graph output (see the module docstring).
    Nested subgraphs (``If``/``Loop`` bodies) are rewired but not cleaned themselves.
    """
    stats = CleanupStats()
    graph = model.graph
    while True:
        changed = _remove_identities(graph, stats)
        changed |= _remove_dead(graph, stats)
        if not changed:
            return stats


def _structural_problems(model: onnx.ModelProto, stats: CleanupStats) -> list[str]:
    """What :func:`clean_graph` promises, checked independently of how it got there."""
    problems = []
    n_identity = sum(1 for n in model.graph.node if n.op_type == "Identity")
    if n_identity != stats.kept_identity:
        problems.append(f"{n_identity} Identity nodes remain, {stats.kept_identity} of them needed")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    dead = CleanupStats()
    _remove_dead(probe.graph, dead)
    if dead.removed_dead:
        problems.append(f"{dead.removed_dead} dead nodes remain")
    return problems


# --------------------------------------------------------------------------------------------------
# Inputs and outputs


def flatten_outputs(out: Any) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs in the order both exporters flatten outputs (torch pytree order:
    sequences by index, dicts by insertion order). A single tensor is ``output``; a tuple/list gives
    ``output_0..n``; a dict gives its keys. Nested containers join the parts with ``.``."""
    pairs: list[tuple[str, torch.Tensor]] = []

    def visit(obj, name):
        if isinstance(obj, torch.Tensor):
            pairs.append((name, obj))
        elif isinstance(obj, (tuple, list)):
            for i, item in enumerate(obj):
                visit(item, f"{name}_{i}" if name == "output" else f"{name}.{i}")
        elif isinstance(obj, Mapping):
            for key, item in obj.items():
                visit(item, str(key) if name == "output" else f"{name}.{key}")
        else:
            raise TypeError(f"output {name!r} is a {type(obj).__name__}; only tensors (in tuples, "
                            f"lists and dicts) can be exported")

    visit(out, "output")
    return pairs


def _cycled(example: torch.Tensor, batch: int) -> torch.Tensor:
    """The example's own rows, cycled along axis 0 to ``batch`` rows (row ``b`` is row ``b mod B``)."""
    return example[torch.arange(batch, device=example.device) % example.shape[0]].clone()


def common_batch(args) -> int | None:
    """The batch size of ``args``: axis 0 of the inputs, where every input that has axes has the
    same length there (``None`` otherwise: a detector's list of images and its targets, say, are
    3 channels, 2 boxes, ... along axis 0, with no batch axis they share)."""
    rows = {int(a.shape[0]) for a in args if a.dim()}
    return rows.pop() if len(rows) == 1 else None


def _verification_run(module, args, batch: int | None, generator: torch.Generator, notes: list[str]) -> tuple:
    """``(inputs, outputs)``: ``module`` run on random inputs like ``args`` at ``batch`` rows
    (:func:`_random_like`; ``None``: each at its own rows); where the model refuses them (its own
    checks on its data, archir's guards), on the example's rows cycled to ``batch``, said once in
    ``notes``."""
    def rows(a):
        return a.shape[0] if batch is None else batch

    inputs = tuple(_random_like(a, rows(a), generator) if a.dim() else a for a in args)
    try:
        return inputs, module(*inputs)
    except Exception as exc:  # noqa: BLE001 - the example's own values are the fallback
        inputs = tuple(_cycled(a, rows(a)) if a.dim() else a for a in args)
        outputs = module(*inputs)  # fails as the model does on its example: reported by the caller
        note = f"the model refuses random inputs ({_first_line(exc)}): checked on the example's values"
        if note not in notes:
            notes.append(note)
        return inputs, outputs


def _random_like(example: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    """A verification input like ``example`` (same dtype, device and shape after the batch axis)
    with ``batch`` rows along axis 0:

    * floating point and complex: standard normal;
    * a **mask**, i.e. a bool tensor or an integer tensor whose example holds only 0 and 1: the
      example's own rows, cycled along the batch axis (row ``b`` is example row ``b mod B``).
      A random mask need not be a valid one: a random 0/1 attention mask together with a causal
      mask leaves some queries with no key at all, where the softmax is 0/0 and PyTorch and ONNX
      Runtime each return something else; the example's rows are valid because the caller chose
      them (a mask that PyTorch ran). The other inputs are still drawn at random;
    * other integers (token ids, indices): uniform over the example's range ``[min, max]``.
    """
    shape = (batch, *example.shape[1:])
    floating = example.dtype.is_floating_point or example.dtype.is_complex
    if not floating and example.numel() and (example.dtype == torch.bool
                                             or bool(((example == 0) | (example == 1)).all())):
        return _cycled(example, batch)
    if floating:
        t = torch.randn(shape, generator=generator, dtype=torch.float32).to(example.dtype)
    else:  # integer ids, indices: stay inside the example's range
        lo = int(example.min()) if example.numel() else 0
        hi = int(example.max()) if example.numel() else 1
        t = torch.randint(lo, hi + 1, shape, generator=generator, dtype=torch.int64).to(example.dtype)
    return t.to(example.device)


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Raise the given loggers to ERROR for the duration (the dynamo exporter logs 'torchvision is
    not installed' four times per export)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _first_line(exc: BaseException) -> str:
    """``Type: first line`` of the innermost cause (TorchExportError's own text is boilerplate)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch colours its messages
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# --------------------------------------------------------------------------------------------------
# Export


def _export_dynamo(module, args, f, input_names, output_names, opset, dynamic_batch):
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} for _ in args)
        if isinstance(module, _FlatArguments):  # ``forward(*tensors)``: one varargs parameter
            dynamic_shapes = (dynamic_shapes,)
    with _quiet_loggers("torch.onnx._internal.exporter._registration"), warnings.catch_warnings():
        # several inputs share the one batch Dim, which is what we want; torch warns about it anyway
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints", category=UserWarning)
        # nn.LSTM/GRU/RNN: torch.export swaps in its own parameter objects, so the layer rebuilds
        # its ``_flat_weights`` list inside forward (harmless: it reads the swapped parameters),
        # and torch's RNN decomposition calls the deprecated ``_check_is_size``; neither is news
        warnings.filterwarnings("ignore", message=r"(?s).*_flat_weights.*were assigned during export",
                                category=UserWarning)
        warnings.filterwarnings("ignore", message=".*_check_is_size will be removed", category=FutureWarning)
        torch.onnx.export(module, args, str(f), dynamo=True, input_names=input_names,
                          output_names=output_names, opset_version=opset,
                          dynamic_shapes=dynamic_shapes, verbose=False, optimize=True,
                          external_data=True)


def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """``aten::rms_norm`` for the TorchScript exporter, which has none (timm's Gemma ViT):
    y = x / sqrt(mean(x², last len(normalized_shape) axes) + eps) · weight, eps defaulting to the
    float32 machine epsilon as in ``torch.rms_norm``."""
    from torch.onnx import symbolic_helper as sh

    dims = sh._get_const(normalized_shape, "is", "normalized_shape")
    axes = list(range(-len(dims), 0))
    eps_value = None if sh._is_none(eps) else sh._maybe_get_const(eps, "f")
    if not isinstance(eps_value, float):
        eps_value = float(torch.finfo(torch.float32).eps)
    square = g.op("Mul", x, x)
    if g.opset >= 18:  # axes became an input of ReduceMean
        mean = g.op("ReduceMean", square, g.op("Constant", value_t=torch.tensor(axes)), keepdims_i=1)
    else:
        mean = g.op("ReduceMean", square, axes_i=axes, keepdims_i=1)
    y = g.op("Div", x, g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps_value)))))
    return y if sh._is_none(weight) else g.op("Mul", y, weight)


def _export_torchscript(module, args, f, input_names, output_names, opset, dynamic_batch, outputs):
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, 9)
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {name: {0: "batch"} for name in input_names}
        dynamic_axes.update({name: {0: "batch"} for name, t in zip(output_names, outputs) if t.dim()})
    with warnings.catch_warnings():
        # chosen deliberately as the fallback: its deprecation notice is not news to the caller
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        # what the tracer warns "might cause the trace to be incorrect" (a detector's glue makes
        # tensors of sizes, indexes with them) the verification against ONNX Runtime then checks
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"(?s).*(To copy construct from a tensor|Exporting aten::index "
                                                  r"operator of advanced indexing)", category=UserWarning)
        torch.onnx.export(module, args, str(f), dynamo=False, input_names=input_names,
                          output_names=output_names, opset_version=opset,
                          dynamic_axes=dynamic_axes, do_constant_folding=True)


def _save_model(model: onnx.ModelProto, tmp: Path, final_name: str, source_dir: Path | None = None) -> None:
    """Write ``model`` to ``tmp``: one file, or above :data:`_EXTERNAL_DATA_THRESHOLD` bytes of
    weights with them in ``{final_name}.data`` beside it (protobuf's 2 GB limit).

    Tensors whose data is still external (``onnx.load(..., load_external_data=False)``, files in
    ``source_dir``) are read one at a time as they are written, so a large model's weights are
    never all in memory at once (``onnx.save_model`` would hold them all, and serialise a copy)."""
    tensors = list(external_data_helper._get_all_tensors(model))
    size = sum(_data_bytes(t) for t in tensors)
    if size <= _EXTERNAL_DATA_THRESHOLD:
        if source_dir is not None:
            external_data_helper.load_external_data_for_model(model, str(source_dir))
        onnx.save_model(model, str(tmp))
        return
    location = f"{final_name}.data"
    with open(tmp.parent / location, "wb") as data:
        for t in tensors:
            offset = data.tell()
            if external_data_helper.uses_external_data(t):
                # file to file: bytes put into the proto would stay in protobuf's arena until the
                # whole model is freed, even once the field is cleared
                length = _copy_external(t, Path(source_dir), data)
            elif t.HasField("raw_data") and len(t.raw_data) >= _INLINE_TENSOR_BYTES:
                length = data.write(t.raw_data)
                t.ClearField("raw_data")
            else:
                continue
            del t.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            t.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(model, str(tmp))


def _copy_external(t: onnx.TensorProto, source_dir: Path, out, chunk: int = 64 << 20) -> int:
    """Append tensor ``t``'s external bytes (read from ``source_dir``) to ``out``; their length."""
    info = external_data_helper.ExternalDataInfo(t)
    left = info.length if info.length else _data_bytes(t)
    with open(source_dir / info.location, "rb") as src:
        src.seek(info.offset or 0)
        written = 0
        while written < left:
            block = src.read(min(chunk, left - written))
            if not block:
                raise RuntimeError(f"the exporter's data file {info.location} ends inside tensor {t.name!r}")
            written += out.write(block)
    return written


def _data_bytes(t: onnx.TensorProto) -> int:
    if external_data_helper.uses_external_data(t):
        return int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return len(t.raw_data)


def _compare(name: str, batch: int | None, got: np.ndarray, ref: np.ndarray, rtol: float, atol: float) -> OutputError:
    """Compare ONNX Runtime's output ``got`` with PyTorch's ``ref``: the output passes when

        max_i |d_i| <= atol + rtol * S,     d_i = got_i - ref_i,     S = max_i |ref_i|

    (``S`` over the finite elements of ``ref``), i.e. the norm-wise relative error in the
    infinity norm, ``||d||_inf / ||ref||_inf``, is at most ``rtol`` (plus ``atol`` for outputs
    that are all near zero).

    Why the output's scale and not each element's own value (``numpy.allclose``'s ``|d_i| <= atol +
    rtol |ref_i|``): two float32 implementations of one model sum in different orders (im2col,
    Winograd, fused kernels, other blockings). For a dot product of length n the rounding error of
    any order is bounded by ``|fl(w.x) - w.x| <= gamma_n sum_k |w_k| |x_k|`` with ``gamma_n = n u /
    (1 - n u)``, ``u = 2^-24`` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
    section 3.1): it is set by the size of the terms, not of their sum. Where the terms cancel to
    an output near zero the elementwise ratio ``|d_i| / |ref_i|`` is unbounded while the model is
    correct. Layers downstream carry these errors forward at the scale of the computation, for
    which the output's largest magnitude ``S`` is the measure the comparison has. Measured on
    the model zoo (docs/zoo.md): deep depthwise nets, ResNet-50 FPN backbones and RAFT differ by
    5e-7..4e-6 of ``S``, with elementwise ratios up to 24 at elements near zero.

    Real bugs stay visible: a wrong op or constant, a dropped branch or a transposed weight change
    the output by a fair fraction of ``S``, far above ``rtol = 1e-4`` (about 1700 ``u``). What any
    such check misses is a change below ``rtol * S`` (one of a thousand weights slightly off can
    be that small); what this one gives up besides is an error confined to the small elements of
    an output whose other elements are much larger: return such parts as separate outputs, each
    compared at its own scale.

    Non-finite values must agree exactly: NaN where both are NaN, the same infinity where the
    reference has one; anything else there counts as an infinite error. A shape mismatch fails
    with infinite errors and says so in ``detail``.
    """
    ref64 = ref.astype(np.float64)
    finite = np.isfinite(ref64)
    scale = float(np.max(np.abs(ref64[finite]))) if finite.any() else 0.0
    if got.shape != ref.shape:
        inf = float("inf")
        return OutputError(name, batch, list(ref.shape), inf, inf, inf, False,
                           f"shape {list(got.shape)} from ONNX Runtime, {list(ref.shape)} from torch", scale)
    got64 = got.astype(np.float64)
    if got64.size == 0:
        return OutputError(name, batch, list(ref.shape), 0.0, 0.0, -atol, True)
    agree = (got64 == ref64) | (np.isnan(got64) & np.isnan(ref64))  # equal infinities, or NaN both
    with np.errstate(invalid="ignore"):
        diff = np.where(agree, 0.0, np.abs(got64 - ref64))
    diff = np.where(np.isnan(diff) | ~finite, np.where(agree, 0.0, np.inf), diff)
    max_abs = float(np.max(diff))
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    excess = max_abs - (atol + rtol * scale)
    return OutputError(name, batch, list(ref.shape), max_abs, rel, excess, bool(excess <= 0), ref_scale=scale)


def _outputs(module: nn.Module, inputs: tuple) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.detach().cpu().numpy() for _, t in flatten_outputs(module(*inputs))]


@contextlib.contextmanager
def _without_onednn():
    # (``torch.backends.mkldnn.flags`` would also set oneDNN's TF32 flag, which warns on CPU builds)
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def _second_opinion(module: nn.Module, inputs: tuple) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """For :func:`_float64_verdict`: the module's outputs in float64 (a copy of it, floating
    inputs cast), and in float32 with PyTorch's native CPU kernels instead of oneDNN's (another
    float32 implementation); None where the module does not run so."""
    try:
        with _without_onednn():
            native = _outputs(module, inputs)
        wide = _outputs(copy.deepcopy(module).double(), tuple(x.double() if x.is_floating_point() else x
                                                               for x in inputs))
        return wide, native
    except Exception:  # noqa: BLE001 - any failure: no second opinion, the float32 verdict stands
        return None


def _rows_verdict(errors: list[OutputError], report: OnnxReport, got: list[np.ndarray], ref: list[np.ndarray]
                  ) -> list[OutputError]:
    """A last opinion on failed outputs that are rows of a ranked set (a detector's detections):
    they pass where ONNX Runtime gives PyTorch's rows in another order among near-tied scores
    (:func:`archir.backends.onnx_rows.reordered_rows`)."""
    from .onnx_rows import reordered_rows

    failed = {e.name for e in errors if not e.passed}
    verdicts = {}
    for found in reordered_rows(report.output_names, got, ref, failed, report.rtol, report.atol):
        for name, err in found.max_abs_err.items():
            verdicts[name] = (found, err)
    out = []
    for e in errors:
        if e.passed or e.name not in verdicts:
            out.append(e)
            continue
        found, err = verdicts[e.name]
        limit = report.atol + report.rtol * e.ref_scale
        out.append(dataclasses.replace(e, passed=True, worst_excess=err - limit,
                                       detail="; ".join(d for d in (e.detail, found.detail()) if d)))
    return out


def _float64_verdict(err: OutputError, got: np.ndarray, refs: Sequence[np.ndarray], ref64: np.ndarray
                     ) -> OutputError:
    """A second opinion on an output that failed :func:`_compare`. With ``x*`` PyTorch's float64
    result (a stand-in for the exact function), ``e_onnx = max_i |onnx_i - x*_i|`` and ``e_torch``
    the largest ``max_i |torch_i - x*_i|`` of PyTorch's float32 runs ``refs`` (its default kernels
    and its native CPU ones: float32's own error, measured by two implementations), the output
    passes when

        e_onnx <= FLOAT64_FACTOR * e_torch

    i.e. ONNX Runtime computes the function about as well as float32 in PyTorch does. Where float32
    is accurate (``e_torch`` tiny) this is stricter than the first check, so it only matters where
    float32 itself is inexact: a network whose activations grow into the thousands with random
    weights, where float32 implementations differ by more than ``rtol`` of the output and none is
    wrong (timm's EfficientNetV2-RW-T: oneDNN 0.19, native kernels 0.46, ONNX Runtime 0.49..0.77
    from float64, at max|x*| 844). What it gives up is a bug smaller than float32's own error
    there, which no float32 comparison can tell from rounding."""
    if any(r.shape != ref64.shape for r in refs) or got.shape != ref64.shape:
        return err
    onnx_err = _compare(err.name, err.batch, got, ref64, 0.0, 0.0).max_abs_err
    torch_err = max(_compare(err.name, err.batch, r, ref64, 0.0, 0.0).max_abs_err for r in refs)
    passed = bool(np.isfinite(onnx_err) and onnx_err <= FLOAT64_FACTOR * torch_err)
    detail = (f"against PyTorch in float64: ONNX Runtime {onnx_err:.3g}, PyTorch float32 {torch_err:.3g}"
              + (" (within float32's own error)" if passed else ""))
    return dataclasses.replace(
        err, passed=passed, detail="; ".join(d for d in (err.detail, detail) if d),
        worst_excess=onnx_err - FLOAT64_FACTOR * torch_err if passed else err.worst_excess,
        float64_onnx_err=onnx_err, float64_torch_err=torch_err)


def export_onnx(
    module: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    output_names: list[str] | None = None,
    input_names: list[str] | None = None,
    exporter: str = "auto",
    seed: int = 0,
    providers: Sequence[str] | None = None,
) -> OnnxReport:
    """Export ``module`` to ONNX at ``path``, clean and check the graph, and (``verify``) compare it
    with PyTorch under ONNX Runtime. See the module docstring for the stages and the maths.

    Input names default to ``input`` (one tensor), else the forward's argument names
    (``images_0``, ``targets_1_boxes`` for the tensors inside a list or dict; ``input_0..`` for
    ``*args``); output names to the dict keys, ``output`` (one tensor) or ``output_0..``. Inputs
    the graph does not read are left out of the ONNX model (``unread_inputs``). With
    ``dynamic_batch`` axis 0 of every input and output is the symbolic ``batch``. ``exporter``:
    ``"auto"`` (dynamo, TorchScript fallback), ``"dynamo"`` or ``"torchscript"``. Raises
    :class:`OnnxVerificationError` on a mismatch, leaving the model at ``<stem>.unverified.onnx``.
    """
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'auto', 'dynamo' or 'torchscript', not {exporter!r}")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    check_onnx_exportable(module)
    flat_names = None
    if args and not all(isinstance(a, torch.Tensor) for a in args):
        module, args, flat_names = _flat_arguments(module, args)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError("example_inputs must be a tensor or a non-empty tuple of tensors, or of lists, "
                        "tuples and dicts of tensors")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unverified = path.with_name(f"{path.stem}.unverified.onnx")

    named_inputs = input_names is None
    if named_inputs:  # one tensor: ``input``; several: the forward's argument names
        input_names = flat_names or (["input"] if len(args) == 1 else _identifiers(argument_names(module, len(args))))
    input_names = list(input_names)
    if len(input_names) != len(args):
        raise ValueError(f"{len(input_names)} input names for {len(args)} inputs")

    notes: list[str] = []
    with eval_mode(module), torch.no_grad():
        flat = flatten_outputs(module(*args))
        names = list(output_names) if output_names is not None else [n for n, _ in flat]
        if len(names) != len(flat):
            raise ValueError(f"{len(names)} output names for {len(flat)} outputs")
        if len(set(names)) != len(names):
            raise ValueError(f"output names are not unique: {names}")
        if named_inputs:  # an ONNX value has one name: an input named like an output is renamed
            input_names = [f"input_{n}" if n in names else n for n in input_names]

        if dynamic_batch and common_batch(args) is None:
            dynamic_batch = False
            notes.append("the inputs share no batch axis (axis 0: " + ", ".join(
                f"{n} {a.shape[0]}" for n, a in zip(input_names, args) if a.dim()) + "): exported at the example's "
                "shapes and checked on random inputs of those shapes")
        if dynamic_batch and not _runs_at_other_batch(module, args, seed, notes):
            dynamic_batch = False

        workdir = Path(tempfile.mkdtemp(prefix=f".{path.stem}.export-", dir=path.parent))
        try:
            raw = workdir / "exported.onnx"  # not the candidate's name: its external data would linger
            used = None
            if exporter == "dynamo":
                _export_dynamo(module, args, raw, input_names, names, opset, dynamic_batch)
                used = "dynamo"
            elif exporter == "auto":
                # torch.export prints partial graphs to stderr when it fails; that is noise when
                # the fallback succeeds, so hold stderr back and replay it only on success.
                held = io.StringIO()
                try:
                    with contextlib.redirect_stderr(held), \
                            _quiet_loggers("torch.fx.experimental.symbolic_shapes"):
                        _export_dynamo(module, args, raw, input_names, names, opset, dynamic_batch)
                        # the exporter's own optimiser can write an invalid graph (timm Gemma's
                        # clamp to a buffer of -inf: a Clip reading a value no node produces)
                        onnx.checker.check_model(str(raw), full_check=True)
                    used = "dynamo"
                    sys.stderr.write(held.getvalue())
                except Exception as exc:  # torch.export could not capture the module, or the model is invalid
                    notes.append(f"dynamo exporter failed ({_first_line(exc)}); "
                                 f"used the TorchScript exporter")
                    shutil.rmtree(workdir)
                    workdir.mkdir()
            if used is None:
                _export_torchscript(module, args, raw, input_names, names, opset, dynamic_batch,
                                    [t for _, t in flat])
                used = "torchscript"

            onnx.checker.check_model(str(raw), full_check=True)
            # the weights stay in the exporter's data file until _save_model copies them over
            model = onnx.load(str(raw), load_external_data=False)
            stats = clean_graph(model)
            problems = _structural_problems(model, stats)
            if problems:
                raise RuntimeError(f"ONNX graph cleanup left problems: {'; '.join(problems)}")
            remove_unread_inputs(model)  # (the TorchScript exporter leaves them out itself)
            kept_inputs = {i.name for i in model.graph.input}
            unread = [n for n in input_names if n not in kept_inputs]
            if unread:
                notes.append(f"inputs the graph does not read are left out of the ONNX model: {', '.join(unread)}")
            if dynamic_batch and _static_batch(model):
                dynamic_batch = False
                notes.append("the exporter fixed the batch size (the traced graph specialises it); "
                             f"the ONNX model takes batch {common_batch(args)} only")
            graph_outputs = [o.name for o in model.graph.output]
            if graph_outputs != names:
                raise RuntimeError(f"exporter named the outputs {graph_outputs}, expected {names}")

            # write, check and verify a candidate beside the destination; only a verified model
            # replaces the file at ``path`` (an earlier, verified one stays until then)
            candidate = workdir / path.name
            _save_model(model, candidate, path.name, source_dir=workdir)
            onnx.checker.check_model(str(candidate), full_check=True)
            opset_used = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
            if opset is not None and opset_used != opset:
                raise UserInputError(f"the {used} exporter could not write opset {opset} (it wrote opset "
                                     f"{opset_used}); choose another --opset or leave it to the exporter")
            report = OnnxReport(
                path=str(path), opset=opset_used, exporter=used, num_nodes=len(model.graph.node),
                op_counts=count_nodes(model), input_names=input_names, output_names=names,
                dynamic_batch=dynamic_batch, removed_identity=stats.removed_identity,
                removed_dead=stats.removed_dead, removed_initializers=stats.removed_initializers,
                kept_identity=stats.kept_identity, rtol=rtol, atol=atol, notes=notes, unread_inputs=unread,
            )
            model = None  # ONNX Runtime loads its own copy of the weights: one is enough
            if verify:
                try:
                    _verify(module, args, candidate, report, seed, providers)
                except _OtherBatchFailed as exc:
                    # The exporter declared a symbolic batch axis but fixed it inside the graph (torch
                    # 2.14 does so for the time axis of a batch_first=False nn.LSTM, on the first
                    # export of a process only): ONNX Runtime cannot run it at another batch size.
                    # Export again with the batch size fixed, as the exporter itself does on later
                    # exports.
                    again = export_onnx(module, args, path, opset=opset, dynamic_batch=False, verify=verify,
                                        rtol=rtol, atol=atol, output_names=output_names, input_names=input_names,
                                        exporter=exporter, seed=seed, providers=providers)
                    again.notes[:0] = notes + [
                        f"ONNX Runtime could not run the model exported with a dynamic batch at batch "
                        f"{exc.batch} ({exc.reason}); exported with the batch size fixed at "
                        f"{common_batch(args)}"]
                    return again
                if not report.passed:
                    with atomic_path(unverified) as tmp:  # kept for inspection, under its own name
                        _save_model(onnx.load(str(candidate), load_external_data=False), tmp, unverified.name,
                                    source_dir=workdir)
                    report.path = str(unverified)
                    worst = report.worst()
                    raise OnnxVerificationError(
                        f"ONNX Runtime output {worst.name!r} "
                        f"({'example shapes' if worst.batch is None else f'batch {worst.batch}'}) differs from PyTorch: "
                        f"max abs error {worst.max_abs_err:.3g} > atol={atol:g} + rtol={rtol:g}*max|ref| = "
                        f"{atol + rtol * worst.ref_scale:.3g} (max|ref| {worst.ref_scale:.3g}, "
                        f"error relative to it {worst.max_rel_err:.3g})"
                        + (f" ({worst.detail})" if worst.detail else "")
                        + f"; model kept at {unverified}"
                        + (f"; {path} was left as it was" if path.exists() else ""), report)
            _install(candidate, path)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        del model
    unverified.unlink(missing_ok=True)  # a stale failure from an earlier run would mislead
    return report


def _install(candidate: Path, path: Path) -> None:
    """Move a checked (and verified) model from its work folder to ``path`` with ``os.replace``
    (atomic on POSIX), its external data file first when it has one."""
    data, old_data = candidate.with_name(f"{candidate.name}.data"), path.with_name(f"{path.name}.data")
    if data.exists():
        os.replace(data, old_data)
    os.chmod(candidate, 0o666 & ~_umask())
    os.replace(candidate, path)
    if not data.exists() and old_data.exists() and not _uses_external_data(path):
        old_data.unlink()  # the replaced model's weights: the new model holds its own


class _FlatArguments(nn.Module):
    """``module`` called with the tensors of its list/tuple/dict arguments one by one: an ONNX
    graph's inputs are single tensors."""

    def __init__(self, module: nn.Module, spec: pytree.TreeSpec):
        super().__init__()
        self.module, self.spec = module, spec

    def forward(self, *tensors):
        return self.module(*pytree.tree_unflatten(list(tensors), self.spec))


def _flat_arguments(module: nn.Module, args: tuple) -> tuple[nn.Module, tuple, list[str]]:
    """``module`` wrapped to take the tensors of ``args`` (lists, tuples and dicts of tensors) as
    separate inputs, those tensors, and their names: ``images_0``, ``batch_mask``."""
    pairs, spec = pytree.tree_flatten_with_path(args)
    if not all(isinstance(t, torch.Tensor) for _, t in pairs):
        bad = next(path for path, t in pairs if not isinstance(t, torch.Tensor))
        raise TypeError(f"example input {bad[0].idx}{pytree.keystr(bad[1:])} is not a tensor: an ONNX "
                        "model's inputs are tensors")
    params = argument_names(module, len(args))

    def name(path) -> str:
        parts = [params[path[0].idx]]
        parts += [str(k.idx if isinstance(k, pytree.SequenceKey) else getattr(k, "key", getattr(k, "name", k)))
                  for k in path[1:]]
        return "_".join(parts)

    return _FlatArguments(module, spec), tuple(t for _, t in pairs), _identifiers([name(path) for path, _ in pairs])


def _identifiers(names: list[str]) -> list[str]:
    """``names`` as ONNX input names (``\\W`` → ``_``), or ``input_0..`` where two would clash."""
    names = [re.sub(r"\W", "_", n) for n in names]
    return names if len(set(names)) == len(names) else [f"input_{i}" for i in range(len(names))]


def _uses_external_data(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _runs_at_other_batch(module, args, seed: int, notes: list[str]) -> bool:
    """Whether PyTorch itself runs ``module`` at batch ``B + 3`` (a graph traced at one batch size
    may hard-code it in a reshape); if not, say so in ``notes``."""
    if common_batch(args) is None:
        return False
    batch = common_batch(args) + _BATCH_EXTRA
    generator = torch.Generator().manual_seed(seed)
    try:
        _verification_run(module, args, batch, generator, notes)
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means: no dynamic batch
        notes.append(f"the module does not run at batch {batch} in PyTorch ({_first_line(exc)}); "
                     f"exported with the batch size fixed at {common_batch(args)}")
        return False


def _static_batch(model: onnx.ModelProto) -> bool:
    """Whether the exported graph's first input has a fixed (numeric) batch dimension."""
    dims = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else []
    return bool(dims) and dims[0].HasField("dim_value")


class _OtherBatchFailed(Exception):
    """ONNX Runtime ran the model at the example's batch size but failed at another one."""

    def __init__(self, batch: int, reason: str):
        super().__init__(reason)
        self.batch, self.reason = batch, reason


def _verify(module, args, path, report: OnnxReport, seed: int, providers) -> None:
    session = ort_session(path, providers)
    report.providers = list(session.get_providers())
    feed_names = {i.name for i in session.get_inputs()}
    batch = common_batch(args)  # None: every input at its own shape (dynamic_batch is off then)
    batches = [batch, batch + _BATCH_EXTRA] if report.dynamic_batch else [batch]
    generator = torch.Generator().manual_seed(seed)
    for b in batches:
        inputs, outputs = _verification_run(module, args, b, generator, report.notes)
        ref = [t.detach().cpu().numpy() for _, t in flatten_outputs(outputs)]
        feed = {n: x.detach().cpu().numpy() for n, x in zip(report.input_names, inputs) if n in feed_names}
        if b == batch:
            got = session.run(report.output_names, feed)
        else:
            import onnxruntime as ort

            quiet = ort.RunOptions()
            quiet.log_severity_level = 4  # a failure here is reported (and handled) by the caller
            try:
                got = session.run(report.output_names, feed, quiet)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
                reason = _first_line(exc)
                raise _OtherBatchFailed(b, reason if len(reason) <= 200 else reason[:199] + "…") from exc
        errors = [_compare(name, b, np.asarray(g), r, report.rtol, report.atol)
                  for name, g, r in zip(report.output_names, got, ref)]
        if not all(e.passed for e in errors):
            second = _second_opinion(module, inputs)
            if second is not None and len(second[0]) == len(second[1]) == len(errors):
                errors = [e if e.passed else _float64_verdict(e, np.asarray(g), (r, rn), r64)
                          for e, g, r, rn, r64 in zip(errors, got, ref, second[1], second[0])]
        if not all(e.passed for e in errors):
            errors = _rows_verdict(errors, report, [np.asarray(g) for g in got], ref)
        report.errors.extend(errors)
        where = "the example shapes" if b is None else f"batch {b}"
        report.notes += [f"output {e.name!r} at {where}: {e.max_rel_err:.3g} of max|ref| from PyTorch float32, "
                         f"over rtol, but passed {e.detail}" for e in errors if e.passed and e.detail]
    report.verified = True
    report.passed = all(e.passed for e in report.errors)
