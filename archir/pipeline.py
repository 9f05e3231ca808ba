"""``archir.transform`` (defined here): trace, build the search space, train, derive, emit. The CLI calls this.

The pipeline is one straight function of named stages (after tinygrad's ``codegen``)::

    trace -> EdgeChoice -> train (architecture stage) -> Derive · Prune · FoldIdentities
          -> train (network stage) -> emit model.py + weights.pt (+ model.onnx) -> report
"""
from __future__ import annotations

import copy
import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import UserInputError
from .fileio import write_text
from .ir import Graph
from .training import TrainConfig

METHODS = ("dnat",)
DEFAULT_OUT = "archir-out"


@dataclass
class TransformOptions:
    """Every option of ``archir transform``; the CLI's flags have the same names."""

    method: str = "dnat"
    share: str = "cell"
    granularity: str = "layer"
    data: str = "digits"
    data_dir: str | None = None
    subset: int | None = None
    # training defaults are the trainer's own (one place to change them)
    epochs: int = TrainConfig.epochs
    arch_epochs: int = TrainConfig.arch_epochs
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    momentum: float = TrainConfig.momentum
    weight_decay: float = TrainConfig.weight_decay
    arch_lr: float = TrainConfig.arch_lr
    arch_optimizer: str = TrainConfig.arch_optimizer
    arch_update: str = TrainConfig.arch_update
    split_fraction: float = TrainConfig.split_fraction
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    from_weights: str | None = None
    force: bool = False
    onnx: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserInputError(f"unknown method {self.method!r}; available: {', '.join(METHODS)}")
        if self.share not in ("cell", "full"):
            raise UserInputError(f"--share must be cell or full, not {self.share!r}")
        if self.arch_update not in ("alternate", "split", "joint"):
            raise UserInputError(f"--arch-update must be alternate, split or joint, not {self.arch_update!r}")
        for name in ("epochs", "arch_epochs"):
            if getattr(self, name) < 0:
                raise UserInputError(f"--{name.replace('_', '-')} must be >= 0")
        if self.batch_size < 1:
            raise UserInputError("--batch-size must be >= 1")
        if not 0 < self.split_fraction < 1:
            raise UserInputError("--split-fraction must be between 0 and 1")


@dataclass
class Result:
    """What ``archir.transform`` returns: the trained slim network, its IR, and the report."""

    module: nn.Module
    graph: Graph
    report: dict[str, Any]
    original_graph: Graph
    out: Path | None = None
    files: dict[str, str] = field(default_factory=dict)


def _prepare_out(out: str | Path | None, force: bool) -> Path | None:
    if out is None:
        return None
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserInputError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserInputError(f"output directory {out} is not empty; choose another --out or pass --force "
                             "to overwrite its files")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _load_weights(model: nn.Module, path: str) -> None:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserInputError(f"--from-weights: file not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UserInputError(f"--from-weights: cannot read {p} as a state_dict: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise UserInputError(f"--from-weights: {p} does not fit the model: {' '.join(first[:3])[:400]}") from exc


def _datasets(opts: TransformOptions, train_data, val_data):
    if train_data is not None:
        if val_data is None:
            raise UserInputError("train_data was given without val_data")
        return train_data, val_data
    from .data import load_dataset

    return load_dataset(opts.data, opts.data_dir, subset=opts.subset, seed=0)


def _loaders(opts: TransformOptions, train_data, val_data, device):
    from .data import as_loader, split_train

    def loader(ds, shuffle, seed, augment=False):
        return as_loader(ds, opts.batch_size, shuffle=shuffle, device=device, seed=seed, augment=augment)

    train = loader(train_data, True, opts.seed, opts.augment)
    val = loader(val_data, False, opts.seed)
    arch = net = None
    if opts.arch_update == "split":
        weight_part, arch_part = split_train(train_data, opts.split_fraction, seed=opts.seed)
        net = train
        train = loader(weight_part, True, opts.seed, opts.augment)
        arch = loader(arch_part, True, opts.seed + 1, opts.augment)
    return train, val, arch, net


def _versions() -> dict[str, str]:
    import archir

    out = {"archir": archir.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import onnx
        import onnxruntime

        out.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    except ImportError:  # pragma: no cover
        pass
    return out


def transform(model: nn.Module, example_inputs, method: str = "dnat", train_data=None, val_data=None,
              out: str | Path | None = None, *, on_epoch: Callable | None = None, **options) -> Result:
    """Transform ``model`` with ``method`` and return the trained, slim result.

    ``options`` are :class:`TransformOptions` fields (``epochs``, ``arch_epochs``, ``share``,
    ``seed``, ``lr``, ``arch_lr``, ``data``, ``device``, ...). ``train_data``/``val_data`` (torch
    data sets) replace ``data``; with ``epochs=0`` no data is needed. With ``out`` set, the
    directory receives model.py, weights.pt, model.onnx, report.json, report.md, graph.svg and
    theta.png.
    """
    from archir.frontends import trace
    from archir.passes.base import PassManager
    from archir.passes.derive import Derive, FoldIdentities, Prune
    from archir.passes.edge_choice import EdgeChoice, arch_parameters, edge_weights, project_thetas

    from .training import TrainConfig, evaluate, resolve_device, seed_everything, train_two_stage

    unknown = set(options) - {f.name for f in dataclasses.fields(TransformOptions)}
    if unknown:
        raise UserInputError(f"unknown option(s): {', '.join(sorted(unknown))}")
    opts = TransformOptions(method=method, **options)
    out_dir = _prepare_out(out, opts.force)
    device = resolve_device(opts.device)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    model = copy.deepcopy(model)  # the user's model is never trained in place
    if opts.from_weights:
        _load_weights(model, opts.from_weights)
    seed_everything(opts.seed)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    graph = trace(model, inputs, opts.granularity)
    graph.verify()
    original = graph.copy(share_root=False)
    timings["trace"] = time.perf_counter() - t0

    PassManager([EdgeChoice(opts.share)])(graph)
    supernet = graph.to_module()
    thetas = arch_parameters(graph)

    def log_arch() -> dict:
        return edge_weights(graph)

    decisions: dict[str, dict] = {}

    def derive(_supernet: nn.Module) -> nn.Module:
        PassManager([Derive()])(graph)
        decisions.update({e.id: dict(e.labels) for e in graph.edges.values() if "decision" in e.labels})
        PassManager([Prune(), FoldIdentities()])(graph)
        return graph.to_module()

    cfg = TrainConfig(epochs=opts.epochs, arch_epochs=min(opts.arch_epochs, opts.epochs),
                      batch_size=opts.batch_size, lr=opts.lr, momentum=opts.momentum,
                      weight_decay=opts.weight_decay, arch_lr=opts.arch_lr, arch_optimizer=opts.arch_optimizer,
                      arch_update=opts.arch_update, split_fraction=opts.split_fraction, device=str(device),
                      seed=opts.seed, progress=opts.progress)
    initial_weights = edge_weights(graph)
    val_loader = train_loader = arch_loader = net_loader = None
    original_acc = None
    if opts.epochs > 0:
        t = time.perf_counter()
        train_ds, val_ds = _datasets(opts, train_data, val_data)
        train_loader, val_loader, arch_loader, net_loader = _loaders(opts, train_ds, val_ds, device)
        timings["data"] = time.perf_counter() - t
        _, original_acc = evaluate(model.to(device), val_loader, device)
        model.cpu()
    result = train_two_stage(supernet, thetas, train_loader, val_loader, cfg, derive=derive,
                             arch_loader=arch_loader, net_loader=net_loader,
                             project_arch=lambda: project_thetas(graph),
                             on_epoch=on_epoch, checkpoint_dir=out_dir, log_arch=log_arch)
    slim = result.network.cpu().eval()
    timings.update({f"train_{k}": v for k, v in result.stage_seconds.items()})

    for eid, labels in decisions.items():  # the original graph, with what changed marked
        original.edges[eid].labels.update(decision=labels["decision"], changed=labels["changed"])
    report = build_report(opts, original, graph, result, original_acc, initial_weights, timings, decisions,
                          example_inputs=inputs)
    res = Result(slim, graph, report, original, out_dir)
    if out_dir is not None:
        from .outputs import write_outputs

        res.files = write_outputs(res, inputs, opts)
    report["time_seconds"]["total"] = time.perf_counter() - t0
    if out_dir is not None:
        write_text(out_dir / "report.json", json.dumps(report, indent=2, default=str))
    return res


def build_report(opts, original: Graph, graph: Graph, result, original_acc, initial_weights, timings,
                 decisions: dict[str, dict], example_inputs: tuple = ()) -> dict[str, Any]:
    edges = []
    for e in original.edges_in_order():
        labels = decisions.get(e.id, {})
        decided = labels.get("decision")
        if decided in ("none", "identity"):
            fate = decided  # identity edges are folded away, none edges pruned
        elif e.id in graph.edges:
            fate = decided or "same"
        else:
            fate = "removed (dead after pruning)"
        edges.append({
            "edge": e.id, "from": e.src, "to": e.dst, "ops": [op.render() for op in e.ops], "group": e.group,
            "choices": labels.get("choices", "same").split(","), "theta": labels.get("theta"),
            "final_weights": labels.get("weights"), "decision": fate,
        })
    history = result.history
    return {
        "method": opts.method,
        "options": dataclasses.asdict(opts),
        "original": {"parameters": original.total_params(), "flops_per_example": original.total_flops(),
                     "edges": len(original.edges), "junctions": len(original.junctions),
                     "val_accuracy_before_training": original_acc},
        "transformed": {"parameters": graph.total_params(), "flops_per_example": graph.total_flops(),
                        "edges": len(graph.edges), "junctions": len(graph.junctions),
                        "val_accuracy": result.val_acc, "val_loss": result.val_loss},
        "decisions": edges,
        "theta_history": [{"epoch": h["epoch"], "stage": h["stage"], "weights": h.get("arch")} for h in history],
        "initial_weights": initial_weights,
        "history": [{k: v for k, v in h.items() if k != "arch"} for h in history],
        "time_seconds": {**timings, "mean_step": result.mean_step_seconds},
        "seed": opts.seed,
        # what `archir export DIR` rebuilds example inputs from (integer inputs keep their range)
        "example_inputs": [{"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch."),
                            **({"min": int(x.min()), "max": int(x.max())}
                               if not (x.is_floating_point() or x.is_complex()) and x.numel() else {})}
                           for x in example_inputs],
        "device": str(result.device),
        "versions": _versions(),
    }
