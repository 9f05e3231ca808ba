"""``archir.transform`` (defined here): a :class:`~archir.search.Search` plus the built-in trainer.

The pipeline is one straight function of named stages (after tinygrad's ``codegen``)::

    archir.search (trace -> the method's search passes) -> preflight on a real batch
      -> [baseline: the original trained alone] -> train (architecture stage)
      -> Search.derive(in_place) (the method's derive passes) -> train (network stage)
      -> emit model.py + weights.pt (+ model.onnx) -> report

Nothing here knows a method: the method is looked up in :mod:`archir.methods` by name and its
options dataclass is filled from ``**options``.
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

from . import methods
from .errors import UserInputError
from .fileio import write_text
from .ir import Graph
from .ir.graph import path_label
from .options import build_options, fields_of, option
from .reexport import input_spec
from .task import Task
from .training import ARCH_OPTIMIZERS, ARCH_UPDATES, RETRAIN_MODES, TrainConfig

DEFAULT_OUT = "archir-out"

#: Training presets for ``--recipe``. A recipe fills the options the user did not give (see
#: :func:`apply_recipe`); the report records the recipe and the effective options.
#:
#: ``dnat-cifar10``: the CIFAR-10 settings of the DNAT paper (Kim & Lee, sec. 4.1: SGD, learning
#: rate 0.025, 600 epochs, cutout for NAS models), for a GPU (600 epochs of a CIFAR-10 model).
#: What the paper leaves out is taken from DARTS (Liu et al. 2019), whose training setup it
#: follows: momentum 0.9, weight decay 3e-4, batch size 96, cutout 16, the cosine schedule
#: (archir's only schedule for ``archir transform``, over both stages), gradient clipping at 5
#: (archir's default). The paper does not say how the 600 epochs split between the architecture
#: and network stages: 300/300 is archir's choice, not the paper's. θ's optimiser and learning
#: rate, and the data (``--data cifar10``), stay the user's (or archir's defaults); there is no
#: weight warm-up (DNAT has none).
RECIPES: dict[str, dict[str, Any]] = {
    "dnat-cifar10": {"epochs": 600, "arch_epochs": 300, "warmup_epochs": 0, "batch_size": 96, "lr": 0.025,
                     "momentum": 0.9, "weight_decay": 3e-4, "augment": True, "cutout": 16},
}


@dataclass
class TransformOptions:
    """The options of ``archir transform`` common to every method; each field is a CLI flag of
    the same name (``arch_lr`` → ``--arch-lr``). A method's own options come from its
    ``Options`` dataclass (see :mod:`archir.methods`)."""

    granularity: str = option("layer", "layer: also cut chains after each activation that follows a "
                              "conv/linear; block: maximal chains.", choices=("layer", "block"))
    data: str = option("digits", "digits (bundled, offline), cifar10 (from --data-dir), or an image-folder path.")
    data_dir: str | None = option(None, "Where cifar10 lives (default ~/.cache/archir-data or $ARCHIR_DATA_DIR).")
    subset: int | None = option(None, "Use only this many training examples (stratified).", minimum=1)
    recipe: str | None = option(None, "A training preset; options given explicitly win over it. dnat-cifar10: "
                                "the DNAT paper's CIFAR-10 settings (SGD lr 0.025, momentum 0.9, weight decay "
                                "3e-4, 600 epochs of which 300 architecture (archir's choice), cosine, batch "
                                "96, cutout 16); meant for a GPU.", choices=tuple(RECIPES))
    epochs: int = option(TrainConfig.epochs, "Total epochs (both stages).", minimum=0)
    arch_epochs: int = option(TrainConfig.arch_epochs, "Epochs of the architecture stage (at most --epochs).",
                              minimum=0)
    warmup_epochs: int | None = option(None, "The first epochs of the architecture stage train only the "
                                       "weights (the architecture parameters do not move); at most "
                                       "--arch-epochs. Default: 1 when the architecture stage has 2 or more "
                                       "epochs, else 0. 0: DNAT as published.", minimum=0)
    batch_size: int = option(TrainConfig.batch_size, "Batch size.", minimum=1)
    lr: float = option(TrainConfig.lr, "SGD learning rate of the weights (cosine schedule).", minimum=0.0)
    momentum: float = option(TrainConfig.momentum, "SGD momentum of the weights.", minimum=0.0)
    nesterov: bool = option(TrainConfig.nesterov, "Nesterov momentum for the weights' SGD.")
    weight_decay: float = option(TrainConfig.weight_decay, "Weight decay of the weights.", minimum=0.0)
    arch_lr: float = option(TrainConfig.arch_lr, "Learning rate of the architecture parameters.", minimum=0.0)
    arch_optimizer: str = option(TrainConfig.arch_optimizer, "Optimiser of the architecture parameters "
                                 "(method: the method's own, e.g. DSO-NAS's APG-NAG; Adam for one without).",
                                 choices=ARCH_OPTIMIZERS)
    arch_update: str = option(TrainConfig.arch_update, "alternate: weights then architecture on each batch; "
                              "split: architecture on a held-out part; joint: one backward pass for both.",
                              choices=ARCH_UPDATES)
    split_fraction: float = option(TrainConfig.split_fraction, "Held-out fraction of the training set for "
                                   "architecture steps with --arch-update split.", minimum=0.01, maximum=0.99)
    augment: bool = option(True, "Random crop and flip of training images.")
    cutout: int = option(0, "Cutout (DeVries & Taylor 2017): zero a square of this side in pixels at a random "
                         "centre of each training image (after normalisation: the data set mean); 0: off.",
                         minimum=0)
    log_dir: str | None = option(None, "Write per-epoch scalars (losses, metric, learning rates, images/s, every "
                                 "architecture weight) to DIR/metrics.csv and TensorBoard event files in DIR "
                                 "(pip install 'archir[tensorboard]').")
    retrain: str = option(TrainConfig.retrain, "How the network stage starts: continue from the searched "
                          "weights, or scratch (every weight back to its value at the start of the run, a fresh "
                          "schedule: DSO-NAS's final training).", choices=RETRAIN_MODES)
    seed: int = option(0, "Seed of every random generator (model initialisation, data order, search).")
    device: str = option("auto", "auto uses CUDA when available.", choices=("auto", "cpu", "cuda"))
    from_weights: str | None = option(None, "Start from these trained weights (a state_dict of the model).")
    baseline: bool = option(False, "Also train the original model on the same data, budget, seed and device, "
                            "and compare the two in the report.")
    force: bool = option(False, "Replace the files of a non-empty output directory (as a whole, when the run "
                         "succeeds), or discard an interrupted run's checkpoint.")
    resume: bool = option(False, "Continue the interrupted run for --out from its last checkpoint (give the "
                          "same options); on CPU the result is bit for bit that of an uninterrupted run.")
    nproc: int = option(1, "Train in N local processes (torch.distributed's elastic launcher; gloo on CPU, NCCL "
                        "with one GPU each) on 1/N of each batch; under torchrun leave it at 1.", minimum=1)
    nan_policy: str = option("stop", "A non-finite loss or gradient: stop (name the epoch and step, keep the last "
                             "good checkpoint) or skip (drop that step's update and go on).",
                             choices=("stop", "skip"))
    onnx: bool = option(True, "Write model.onnx (checked against ONNX Runtime).")
    submodule: str | None = option(None, "Search inside this part of the model only (a dotted path as in "
                                   "named_modules(), e.g. backbone), for a model whose own forward cannot be "
                                   "traced (a detector): the whole model trains with its loss; model.py holds "
                                   "the slim part, whole_weights.pt the whole model's weights.")
    auto_submodule: bool = option(True, "Where the model's own forward cannot be traced and no --submodule is "
                                  "given, search inside its largest child that can be (said on the terminal and "
                                  "in the report); --no-auto-submodule makes that an error.")
    progress: bool = option(True, "Progress bars and per-epoch lines.", cli=False)


@dataclass
class Result:
    """What ``archir.transform`` returns: the trained slim network, its IR, and the report."""

    module: nn.Module
    graph: Graph
    report: dict[str, Any]
    original_graph: Graph
    out: Path | None = None
    files: dict[str, str] = field(default_factory=dict)
    baseline: nn.Module | None = None
    #: with ``submodule``: the whole trained model, ``module`` in the submodule's place
    whole: nn.Module | None = None


def apply_recipe(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` with ``options["recipe"]``'s settings (:data:`RECIPES`) filled in for every
    option not in ``options``, and the settings the recipe supplied. An option given explicitly
    wins, even when its value equals the dataclass default (``--lr 0.1`` and ``lr=0.1`` beat the
    recipe's 0.025): from the CLI the pipeline receives only the flags that were typed, from
    Python only the keywords that were passed. No recipe (or ``recipe=None``): unchanged."""
    options = dict(options)
    if options.get("recipe", 0) is None:
        del options["recipe"]
    name = options.get("recipe")
    if name is None:
        return options, {}
    from .options import check_value

    check_value(TransformOptions, "recipe", name)
    applied = {k: v for k, v in RECIPES[name].items() if k not in options}
    return {**options, **applied}, applied


def check_transform_options(opts: TransformOptions) -> None:
    """The checks between options: ``--warmup-epochs`` at most ``--arch-epochs``."""
    if opts.warmup_epochs is not None and opts.warmup_epochs > opts.arch_epochs:
        raise UserInputError(f"--warmup-epochs ({opts.warmup_epochs}) must be at most --arch-epochs "
                             f"({opts.arch_epochs}): the warm-up is the start of the architecture stage")


def split_options(method: str, options: dict[str, Any]) -> tuple[TransformOptions, methods.Method]:
    """``options`` → (the common options, the method with its own options), each checked."""
    common = fields_of(TransformOptions)
    method_cls = methods.get(method)
    own = fields_of(method_cls.Options)
    unknown = sorted(set(options) - set(common) - set(own))
    if unknown:
        raise UserInputError(f"unknown option(s): {', '.join(unknown)}; method {method} takes "
                             f"{', '.join(own) or 'no options of its own'} besides the common ones "
                             f"({', '.join(common)})")
    opts = build_options(TransformOptions, {k: v for k, v in options.items() if k in common}, "archir transform")
    check_transform_options(opts)
    chosen = methods.create(method, **{k: v for k, v in options.items() if k in own})
    return opts, chosen


def _prepare_out(out: str | Path | None, force: bool, resume: bool = False):
    """The run's :class:`~archir.output_dir.RunDir` (None without ``out``): ``out`` checked, its
    staging directory writable (see :func:`archir.output_dir.prepare_run_dir`)."""
    from .output_dir import prepare_run_dir
    from .preflight import check_writable

    if out is None:
        if resume:
            raise UserInputError("resume=True needs out: the directory of the interrupted run")
        return None
    run = prepare_run_dir(out, force=force, resume=resume)
    # where the staging directory goes (made at the first checkpoint)
    check_writable(run.final.parent, f"--out {run.final} (its folder {run.final.parent})")
    return run


#: Options that may differ between an interrupted run and its ``--resume``.
RESUME_MAY_CHANGE = ("resume", "force", "progress", "nan_policy", "onnx", "baseline", "device", "nproc")


def _check_resume(checkpoint: dict, meta: dict) -> None:
    """The options of a ``--resume`` must be those of the interrupted run (else the result would
    be neither run); one line names the first that differs."""
    saved = checkpoint.get("meta") or {}
    if saved.get("method") != meta["method"]:
        raise UserInputError(f"--resume: the interrupted run used --method {saved.get('method')}, not {meta['method']}")
    for group in ("options", "method_options"):
        for name, value in (saved.get(group) or {}).items():
            if name in RESUME_MAY_CHANGE:
                continue
            now = meta[group].get(name)
            if now != value:
                flag = "--" + name.replace("_", "-")
                raise UserInputError(f"--resume: the interrupted run used {flag} {value}, this command {flag} {now}; "
                                     "give the same options to continue it")


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
    if not isinstance(state, dict):
        raise UserInputError(f"--from-weights: {p} holds a {type(state).__name__}, not a state_dict")
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

    return load_dataset(opts.data, opts.data_dir, subset=opts.subset, seed=0, progress=opts.progress)


def _own_data(train_data, val_data) -> str:
    """How the report names data sets given to :func:`transform` (MODEL.py's ``data()``)."""
    def one(ds) -> str:
        try:
            return f"{type(ds).__name__} ({len(ds)} samples)"
        except TypeError:  # an iterable data set has no length
            return type(ds).__name__
    return f"own: {one(train_data)} / {one(val_data)}"


def lists_sized_by_batch(graph: Graph, batch_size: int) -> list[str]:
    """The list and tuple inputs of ``graph`` (a detector's images and targets) whose traced
    length is ``batch_size``: the traced graph reads their items by position and refuses another
    length (:func:`archir.ir.guards.check_length`), so a data set that does not divide into such
    batches must leave its last, smaller batch out rather than fail at the end of an epoch."""
    return [path_label(path) for path, n in graph.input_lengths.items() if n == batch_size]


def _skipped_last_batch(opts: TransformOptions, fixed: list[str], datasets: dict) -> dict | None:
    """What leaving out the last, smaller batch (``fixed``: :func:`lists_sized_by_batch`) costs
    each data set per epoch, said once; None when nothing is left out. A data set smaller than one
    batch is refused: it would give no batch at all."""
    from .data import DataError

    if not fixed:
        return None
    skipped = {}
    for part, ds in datasets.items():
        try:
            n = len(ds)
        except TypeError:  # an iterable data set has no length: the loader drops what it must
            continue
        if n < opts.batch_size:
            raise DataError(f"the {part} data has {n} samples, fewer than one batch of {opts.batch_size}, and the "
                            f"model takes {', '.join(fixed)} as exactly {opts.batch_size} items: give more "
                            f"samples or a smaller --batch-size (then trace on an example of that size)")
        if n % opts.batch_size:
            skipped[part] = n % opts.batch_size
    if not skipped:
        return None
    what = ", ".join(f"{k} of the {part} samples" for part, k in skipped.items())
    _say(opts, f"note: the model takes {', '.join(fixed)} as exactly {opts.batch_size} items (as traced), so "
               f"each epoch leaves out its last, smaller batch: {what}")
    return {"inputs": fixed, "samples_left_out": skipped}


def _loaders(opts: TransformOptions, train_data, val_data, device, collate: Callable | None = None,
             drop_last: bool = False):
    from .data import as_loader, split_train

    def loader(ds, shuffle, seed, augment=False, cutout=0):
        return as_loader(ds, opts.batch_size, shuffle=shuffle, device=device, seed=seed, augment=augment,
                         cutout=cutout, collate=collate, drop_last=drop_last)

    # every training loader (the held-out architecture part too) gets the same augmentation
    train = loader(train_data, True, opts.seed, opts.augment, opts.cutout)
    val = loader(val_data, False, opts.seed)
    arch = net = None
    if opts.arch_update == "split":
        weight_part, arch_part = split_train(train_data, opts.split_fraction, seed=opts.seed)
        net = train
        train = loader(weight_part, True, opts.seed, opts.augment, opts.cutout)
        arch = loader(arch_part, True, opts.seed + 1, opts.augment, opts.cutout)
        for part, ds, batches in (("weight", weight_part, train), ("architecture", arch_part, arch)):
            if drop_last and len(batches) == 0:  # every batch left out: a search with no step
                from .data import DataError

                raise DataError(f"the {part} part of the training data (--arch-update split, --split-fraction "
                                f"{opts.split_fraction}) has {len(ds)} samples, fewer than one batch of "
                                f"{opts.batch_size} that the model takes: give more samples, another "
                                "--split-fraction, or --arch-update alternate")
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


def effective_warmup(opts: TransformOptions) -> int:
    """The weight warm-up epochs a run uses: ``warmup_epochs`` cut short with the architecture
    stage, or by default (None) 1 epoch when that stage has 2 or more. Why 1 by default, from
    ``bench/results/warmup_sweep.md`` (ResNet20, 4,000 CIFAR-10 images, 8 epochs of which 4
    architecture): without a warm-up the only setting that changed edges did so in the first
    epoch, on an untrained network; with one epoch of warm-up no edge changed before the
    network had trained an epoch, and θ lr 0.05 (the default) lost no accuracy."""
    arch_epochs = min(opts.arch_epochs, opts.epochs)
    if opts.warmup_epochs is None:
        return 1 if arch_epochs >= 2 else 0
    return min(opts.warmup_epochs, arch_epochs)


def _train_config(opts: TransformOptions, device) -> TrainConfig:
    arch_epochs = min(opts.arch_epochs, opts.epochs)  # the warm-up is cut short with the stage
    return TrainConfig(epochs=opts.epochs, arch_epochs=arch_epochs,
                       warmup_epochs=effective_warmup(opts), batch_size=opts.batch_size,
                       lr=opts.lr, momentum=opts.momentum, nesterov=opts.nesterov,
                       weight_decay=opts.weight_decay, arch_lr=opts.arch_lr,
                       arch_optimizer=opts.arch_optimizer, arch_update=opts.arch_update,
                       split_fraction=opts.split_fraction, device=str(device), seed=opts.seed,
                       progress=opts.progress, retrain=opts.retrain, nan_policy=opts.nan_policy)


def transform(model: nn.Module, example_inputs, method: str = "dnat", train_data=None, val_data=None,
              out: str | Path | None = None, *, on_epoch: Callable | None = None, task: Task | None = None,
              leaf_modules=(), groups: dict | None = None, collate: Callable | None = None, **options) -> Result:
    """Transform ``model`` with ``method`` and return the trained, slim result.

    ``options`` are :class:`TransformOptions` fields (``epochs``, ``arch_epochs``, ``seed``,
    ``lr``, ``arch_lr``, ``data``, ``device``, ``baseline`` ...) and the method's own options (DNAT:
    ``share``). ``train_data``/``val_data`` (torch data sets) replace ``data``; with ``epochs=0``
    no data is needed. ``recipe="dnat-cifar10"`` (:data:`RECIPES`) fills in every option not
    passed here (an option passed explicitly wins, whatever its value). ``task``
    (:func:`archir.task.make_task`) sets the loss and the metric (default: cross-entropy and
    top-1 accuracy). ``leaf_modules``: submodule paths to keep whole (opaque) when tracing; with
    ``out`` set, one that model.py cannot rebuild is refused before any training. ``groups``:
    explicit cell-sharing groups, ``{name: [module path prefix, ...]}`` (see :func:`archir.trace`).
    ``collate``: how a list of samples of ``train_data``/``val_data`` becomes a batch (the
    ``collate_fn`` of :class:`torch.utils.data.DataLoader`; default: stack their tensors), e.g.
    ``lambda samples: (*map(list, zip(*samples)),)`` for a detector's lists of images and targets.
    With ``out`` set, the directory receives model.py, weights.pt, model.onnx, report.json, report.md, graph.svg and arch.png.
    """
    from .preflight import check_device, check_epochs, check_room, required_bytes
    from .task import classification_task
    from .training import seed_everything, train_plain, train_two_stage

    options, from_recipe = apply_recipe(options)
    explicit = set(options) - set(from_recipe)
    method_defaults = {k: v for k, v in methods.get(method).default_options.items() if k not in options}
    options = {**options, **method_defaults}  # what the method suggests, where nobody said otherwise
    opts, chosen = split_options(method, options)
    if train_data is not None:  # the report names the data the run used, not --data's default
        opts = dataclasses.replace(opts, data=_own_data(train_data, val_data))
    check_epochs(dataclasses.asdict(opts), explicit)
    task = task or classification_task()
    device = check_device(opts.device)
    world = _join_world(opts)  # several processes (torchrun, --nproc): rank 0 checks and writes
    if world is not None:
        device = world.device
    writes = world is None or world.is_writer
    run_dir = _agreed(world, lambda: _prepare_out(out, opts.force, opts.resume))
    out_dir = run_dir.staging if run_dir is not None else None  # checkpoints and outputs go here first
    meta = {"method": method, "options": dataclasses.asdict(opts), "method_options": dataclasses.asdict(chosen.options)}
    resume_from = None
    if run_dir is not None and run_dir.resume_from is not None:
        from .training import load_checkpoint

        def load():
            checkpoint = load_checkpoint(run_dir.resume_from)
            _check_resume(checkpoint, meta)
            return checkpoint

        resume_from = _agreed(world, load)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    if opts.from_weights:  # into a copy: the user's model is never changed (Search trains its own copy)
        model = copy.deepcopy(model)
        _load_weights(model, opts.from_weights)
    seed_everything(opts.seed)
    baseline_model = copy.deepcopy(model) if opts.baseline else None
    search, automatic = _search_model_or_part(model, example_inputs, chosen, opts, leaf_modules, groups,
                                              emits=out_dir is not None)
    if automatic is not None:  # the rest of the run is that of --submodule PATH
        opts = dataclasses.replace(opts, submodule=automatic["path"])
    inputs = search.example_inputs  # with ``submodule``: what that part receives (model.py's inputs)
    if out_dir is not None:  # refuse what model.py or model.onnx cannot hold before any training
        from .backends.standalone import check_emittable

        original_module = search.original.to_module()  # what derive keeps comes from here, for any method
        check_emittable(original_module)
        if opts.onnx:
            from .backends.onnx_export import check_onnx_exportable

            check_onnx_exportable(original_module)
        _agreed(world, lambda: check_room(run_dir.final.parent, required_bytes(model, search.supernet),
                                          f"--out {run_dir.final}"))
    timings["trace"] = time.perf_counter() - t0

    cfg = _train_config(opts, device)
    initial_weights = search.arch_weights()
    loaders: dict[str, Any] = {"train": None, "val": None, "arch": None, "net": None}
    fixed: list[str] = []  # list inputs as long as a batch: each loader drops its last, smaller batch
    skipped_last_batch = None
    if opts.epochs > 0:
        t = time.perf_counter()
        train_ds, val_ds = _datasets(opts, train_data, val_data)
        if not opts.submodule:  # a part's inputs are what the model computes, not the batch
            fixed = lists_sized_by_batch(search.graph, opts.batch_size)
        skipped_last_batch = _skipped_last_batch(opts, fixed, {"training": train_ds, "validation": val_ds})
        loaders.update(zip(("train", "val", "arch", "net"),
                           _loaders(opts, train_ds, val_ds, device, collate, drop_last=bool(fixed))))
        # the trainer runs the model, loss and metric once on the first batch before any step
        # (archir.task.check_task), so a data/model mismatch is one clear error before training
        timings["data"] = time.perf_counter() - t

    baseline = None
    if baseline_model is not None and opts.epochs > 0:
        t = time.perf_counter()
        _say(opts, f"baseline: training the original {search.graph.name} alone ({opts.epochs} epochs)")
        # loaders of its own with the same seeds: the transformed run then sees the same batches
        # in the same order (and augmentation) as it would without a baseline
        train, val, _, net = _loaders(opts, train_ds, val_ds, device, collate, drop_last=bool(fixed))
        baseline = train_plain(baseline_model, net or train, val, cfg, task=task)
        del train, val, net
        timings["baseline"] = time.perf_counter() - t

    if opts.epochs > 0:
        warmup = f" ({cfg.warmup_epochs} weight warm-up)" if cfg.warmup_epochs else ""
        recipe = f" (recipe {opts.recipe})" if opts.recipe else ""
        _say(opts, f"{chosen.describe()}: {len(initial_weights)} searchable edges, {cfg.arch_epochs} architecture"
                   f"{warmup} then {cfg.epochs - cfg.arch_epochs} network epochs{recipe}")
        if not initial_weights:  # not an error (the weights still train), but rarely what was meant
            from .progress import say

            say(f"warning: {chosen.name} finds nothing to search in {search.graph.name} "
                f"({chosen.candidates(search.graph)}): this run only trains the weights; "
                "`archir inspect MODEL.py --method NAME` shows what each method could change")
    has_penalty = type(chosen).extra_loss is not methods.Method.extra_loss
    # held-out data a method may score architectures on before derive (NAO); none without training
    evaluator = (_arch_evaluator(opts, train_ds, val_ds, loaders, device, task, collate, drop_last=bool(fixed))
                 if opts.epochs > 0 and cfg.arch_epochs > 0 else None)
    epoch_hook, run_log = _epoch_logger(opts, cfg, on_epoch, resume_from)
    if opts.epochs > 0:  # one architecture step per batch of the search epochs (after the warm-up)
        search_epochs = min(cfg.arch_epochs, cfg.epochs) - min(cfg.warmup_epochs, cfg.arch_epochs, cfg.epochs)
        chosen.plan_search(search.graph, max(search_epochs, 0) * len(loaders["train"]))
    result = train_two_stage(search.model, search.arch_parameters(), loaders["train"], loaders["val"], cfg,
                             derive=lambda _supernet: _choose_and_derive(search, evaluator, timings),
                             arch_loader=loaders["arch"], net_loader=loaders["net"],
                             # a method's extra_loss may answer None (no penalty): add 0 then
                             extra_loss=(lambda _m: _zero_if_none(search.extra_loss())) if has_penalty else None,
                             on_epoch=epoch_hook, checkpoint_dir=out_dir, log_arch=search.arch_weights,
                             resume=resume_from, checkpoint_meta=meta, extra_state=_method_state(chosen),
                             log_changes=lambda: changed_edges(search), task=task,
                             arch_optimizer=lambda params, lr: chosen.arch_optimizer(search.graph, params, lr))
    if run_log is not None:
        run_log.close()
    whole = result.network.cpu().eval()  # with ``submodule``: the whole model, the slim part inside
    _check_finite_weights(whole, opts)
    slim = whole.get_submodule(opts.submodule) if opts.submodule else whole
    timings.update({f"train_{k}": v for k, v in result.stage_seconds.items()})
    timings.update(eval=result.eval_seconds, derive=result.derive_seconds)  # outside train_* (validation, derive)

    graph = search.derived_graph
    for eid, labels in search.recorded_decisions.items():  # the original graph, with what changed marked
        if eid in search.original.edges:
            search.original.edges[eid].labels.update(decision=labels["decision"], changed=labels["changed"])
    report = build_report(opts, chosen, search.original, graph, result, initial_weights, timings,
                          search.recorded_decisions, example_inputs=inputs, baseline=baseline, task=task,
                          recipe_applied=from_recipe)
    report["method_defaults"] = method_defaults  # the method's suggested options that were used
    report["last_batch_left_out"] = skipped_last_batch
    if search.choice_log is not None:  # what the method's own architecture search did (NAO)
        report["architecture_search"] = search.choice_log
    if opts.submodule:
        report["submodule"] = _submodule_report(opts.submodule, model, whole)
        if automatic is not None:
            report["submodule"]["automatic"] = automatic["why"]
    res = Result(slim, graph, report, search.original, out_dir,
                 baseline=baseline.network.cpu().eval() if baseline is not None else None,
                 whole=whole if opts.submodule else None)
    if world is not None:
        report["distributed"] = {"processes": world.size, "backend": world.backend}
    if not writes:  # ranks other than 0 return the same network and write nothing
        res.out = None
        return res
    if baseline is not None:
        from .comparison import compare

        # latency of the part searched (with ``submodule`` the rest of the model is the same)
        original_part = res.baseline.get_submodule(opts.submodule) if opts.submodule else res.baseline
        report["baseline"] = compare(original_part, slim, inputs, baseline, result, search.original, graph)
    if out_dir is not None:
        from .output_dir import write_outputs

        t = time.perf_counter()
        out_dir.mkdir(parents=True, exist_ok=True)
        res.files = write_outputs(res, inputs, opts.onnx)
        report["time_seconds"]["outputs"] = time.perf_counter() - t  # model.py, ONNX + its check, drawings
    report["time_seconds"]["total"] = time.perf_counter() - t0
    if run_dir is not None:
        from .output_dir import commit_run_dir

        final = run_dir.final
        res.files = {k: str(final / Path(v).name) for k, v in res.files.items()}
        if "onnx" in report:
            report["onnx"]["path"] = str(final / Path(report["onnx"]["path"]).name)
        write_text(out_dir / "report.json", json.dumps(report, indent=2, default=str))
        commit_run_dir(run_dir)  # the old outputs stay whole until here
        res.out = final
    return res


def _method_state(method: methods.Method):
    """``(get, set)`` of a method's own state for checkpoints, when it has one: ``state_dict()``
    and ``load_state_dict(state)`` (plain values and tensors), e.g. DSO-NAS's budget controller."""
    get, put = getattr(method, "state_dict", None), getattr(method, "load_state_dict", None)
    return (get, put) if callable(get) and callable(put) else None


def _join_world(opts: TransformOptions):
    """This process's :class:`archir.distributed.World` when launched with several processes
    (torchrun, ``--nproc``), else None; ``nproc`` > 1 outside a launcher is the CLI's to start."""
    from . import distributed

    if opts.nproc > 1 and not distributed.launched():
        raise UserInputError(f"nproc={opts.nproc}: the archir command starts the processes (archir transform ... "
                             f"--nproc {opts.nproc}); from Python, run your script under torchrun --nproc-per-node "
                             f"{opts.nproc} instead")
    return distributed.setup(opts.device)


def _agreed(world, check: Callable[[], Any]) -> Any:
    """``check()`` on rank 0 (a preflight, loading a checkpoint) and its answer, or its
    UserInputError, on every rank: the processes of a run fail together with one message."""
    if world is None:
        return check()
    answer, error = None, None
    if world.is_writer:
        try:
            answer = check()
        except UserInputError as exc:
            error = str(exc)
    answer, error = world.broadcast_object((answer, error))
    if error is not None:
        raise UserInputError(error)
    return answer


def _check_finite_weights(module: nn.Module, opts: TransformOptions) -> None:
    """Refuse to write a network whose weights are NaN or infinite (with ``--nan-policy skip``
    every step may have been skipped after the weights broke). Buffers may hold infinities on
    purpose (clamp bounds such as timm Gemma's ``input_min = -inf``): only NaN counts there."""
    bad = [n for n, t in module.named_parameters() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    bad += [n for n, t in module.named_buffers() if t.is_floating_point() and bool(torch.isnan(t).any())]
    if bad:
        from .errors import NonFiniteLoss

        raise NonFiniteLoss(f"the trained weights hold NaN or infinite values ({', '.join(bad[:3])}"
                            f"{' …' if len(bad) > 3 else ''}); nothing was written. Lower --lr (now {opts.lr}) "
                            "or --arch-lr, or use --nan-policy stop to stop at the first such step")


def _arch_evaluator(opts: TransformOptions, train_ds, val_ds, loaders: dict, device, task: Task,
                    collate: Callable | None = None, drop_last: bool = False):
    """The :class:`~archir.arch_eval.ArchEvaluator` a method may score architectures with before
    derive: the held-out part of the training set with ``--arch-update split`` (else the
    validation set), without augmentation; BatchNorm calibration batches from the training loader."""
    from .arch_eval import ArchEvaluator
    from .data import as_loader, split_train

    held_out = split_train(train_ds, opts.split_fraction, seed=opts.seed)[1] if opts.arch_update == "split" else val_ds
    data = as_loader(held_out, opts.batch_size, shuffle=False, device=device, seed=opts.seed, collate=collate,
                     drop_last=drop_last)
    return ArchEvaluator(data, loaders["train"], task, device, log=lambda line: _say(opts, line))


def _choose_and_derive(search, evaluator, timings: dict[str, float]) -> nn.Module:
    """The method's own choice of architecture (:meth:`Search.choose_architecture`; timed as
    ``choose_architecture``), then the in-place derive; with ``submodule`` the network to train
    next is the whole model with the derived part in place."""
    t = time.perf_counter()
    search.choose_architecture(evaluator)
    timings["choose_architecture"] = time.perf_counter() - t
    return search.whole_model(search.derive(in_place=True), copy=False)


def _search_model_or_part(model: nn.Module, example_inputs, chosen, opts: TransformOptions, leaf_modules,
                          groups, emits: bool = False) -> tuple[Any, dict[str, str] | None]:
    """``Search`` on the whole model, or (``auto_submodule``, no ``submodule`` given) where the
    model's own ``forward`` cannot be traced, or (``emits``, no ``leaf_modules``) its graph holds
    parts that model.py cannot (a detector traced whole: torchvision's transform and heads), on
    its largest child that can: the rest of the model runs and trains as it is, as with ``--submodule PATH``.
    Returns the search and, for a part chosen here, ``{"path": ..., "why": ...}`` (said on the
    terminal, kept in report.json)."""
    from .backends.standalone import StandaloneError, check_emittable
    from .errors import TraceError
    from .progress import say
    from .search_space import Search, inside_part, largest_part_that_traces, untraceable_reason

    def search(part: str | None, leaves, part_groups):
        return Search(model, example_inputs, chosen, granularity=opts.granularity, leaf_modules=leaves,
                      groups=part_groups, submodule=part)

    def search_part(path: str):
        return search(path, *inside_part(path, leaf_modules, groups))

    automatic = opts.submodule is None and opts.auto_submodule
    try:  # an explicit submodule's leaves and groups are given relative to it
        whole = search(opts.submodule, leaf_modules, groups)
    except TraceError as failure:
        if not automatic:
            raise
        found = largest_part_that_traces(model, search_part)
        if found is None:
            raise
        why = untraceable_reason(model, failure)
    else:
        if not (emits and automatic) or leaf_modules:  # parts the user keeps opaque: refused as asked
            return whole, None
        try:
            check_emittable(whole.original.to_module())
            return whole, None
        except StandaloneError as exc:
            found = largest_part_that_traces(model, search_part)
            if found is None:
                return whole, None  # the caller's own check says why model.py cannot hold it
            whole.close()
            what = str(exc).removeprefix("cannot emit a standalone model.py: ").split(": ")[0]  # its first clause
            why = f"{type(model).__name__} traces whole, but model.py could not hold it ({what})"
    path, found_search, share = found
    say(f"warning: {why}; searching inside its largest part that does, {path!r} ({share}); the rest of the model "
        "runs and trains as it is. --submodule PATH chooses the part; --no-auto-submodule shows the tracing "
        "error instead")
    return found_search, {"path": path, "why": f"{why}; {path!r} is its largest part that traces ({share})"}


def _submodule_report(path: str, original: nn.Module, whole: nn.Module) -> dict[str, Any]:
    """report.json's ``submodule``: which part was searched, and the whole model's parameters
    before and after (the graphs' figures are the part's)."""
    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    return {"path": path, "model": type(whole).__name__, "whole_parameters": {
        "original": count(original), "transformed": count(whole)}}


def _zero_if_none(value):
    return torch.zeros(()) if value is None else value


def changed_edges(search) -> tuple[list[str], int]:
    """``(sorted ids of the searchable edges whose leading choice is not the original, number of
    searchable edges)`` from ``search.decisions()``, for any method: the original is the choice
    named "same" where there is one (DNAT), else the choice listed last (the convention
    :meth:`~archir.search_space.Search.decisions` documents)."""
    decisions = search.decisions()
    own = search.method.changed_edges(search.graph) if search.derived_graph is None else None
    if own is not None:  # the method says itself which edges changed (DSO-NAS: λ = 0)
        return sorted(own), len(decisions)
    changed = [eid for eid, d in decisions.items()
               if d["choice"] != ("same" if "same" in d["choices"] else d["choices"][-1])]
    return sorted(changed), len(decisions)


def _epoch_logger(opts: TransformOptions, cfg: TrainConfig, on_epoch: Callable | None, resumed: dict | None = None):
    """The trainer's per-epoch hook: ``--log-dir``'s :class:`~archir.run_log.RunLog` row, then the
    caller's ``on_epoch``; and the RunLog (None without ``--log-dir``). Made before any training,
    so an unusable directory is one clear error up front. A resumed run (``resumed``, its
    checkpoint) keeps the rows of the epochs it finished before."""
    from . import distributed

    world = distributed.current()
    if opts.log_dir is None or (world is not None and not world.is_writer):  # rank 0 logs for all
        return on_epoch, None
    from .progress import say
    from .run_log import RunLog, epoch_scalars

    keep = len(resumed.get("history") or []) if resumed is not None else None
    run_log = RunLog(opts.log_dir, say=lambda line: say(line, opts.progress), keep_until=keep)

    def hook(record) -> None:
        run_log.log(record.epoch + 1, epoch_scalars(record, cfg.batch_size, cfg.arch_lr))
        if on_epoch is not None:
            on_epoch(record)

    return hook, run_log


def _say(opts: TransformOptions, line: str) -> None:
    if opts.progress:
        from tqdm import tqdm

        tqdm.write(line)


def build_report(opts: TransformOptions, method: methods.Method, original: Graph, graph: Graph, result,
                 initial_weights, timings, decisions: dict[str, dict], example_inputs: tuple = (),
                 baseline=None, task: Task | None = None,
                 recipe_applied: dict[str, Any] | None = None) -> dict[str, Any]:
    """The transform report (report.json less what :func:`transform` adds afterwards: ``baseline``,
    the output files' entries and the total time): method and options, parameters and FLOPs
    (multiply-adds per example) of the original and transformed graphs, each original edge's fate
    (same, identity, none or removed as dead), architecture weights and training history per
    epoch, timings, seed, example-input specs, device and versions. ``options`` are the effective
    options (a recipe's settings included); ``recipe`` names the recipe and the settings it
    supplied (``applied``) and those of its settings that were given explicitly (``explicit``)."""
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
            "choices": labels.get("choices", "same").split(","), "param": labels.get("param"),
            "final_weights": labels.get("weights"), "decision": fate, "why": labels.get("why"),
            # the method's own word where it gave one (a kernel/activation choice can keep the
            # original under any name), else: anything but the original operations is a change
            "changed": bool(labels["changed"]) if labels.get("changed") is not None else fate != "same",
        })
    for eid, labels in decisions.items():  # edges the search space added that the network kept
        if eid not in original.edges and labels.get("changed") and eid in graph.edges:
            edges.append({"edge": eid, "from": labels.get("from"), "to": labels.get("to"),
                          "ops": [op.render() for op in graph.edges[eid].ops], "group": None,
                          "choices": labels.get("choices", "same").split(","), "param": labels.get("param"),
                          "final_weights": labels.get("weights"), "decision": labels.get("decision"),
                          "why": labels.get("why"), "changed": True})
    history = result.history
    metric = result.metric_name
    return {
        "method": method.name,
        "method_options": dataclasses.asdict(method.options),
        "options": dataclasses.asdict(opts),
        "recipe": ({"name": opts.recipe, "applied": dict(recipe_applied or {}),
                    "explicit": sorted(set(RECIPES[opts.recipe]) - set(recipe_applied or {}))}
                   if opts.recipe else None),
        "effective": {"arch_epochs": min(opts.arch_epochs, opts.epochs),
                      "warmup_epochs": effective_warmup(opts)},
        "metric": metric,
        "original": {"parameters": original.total_params(), "flops_per_example": original.total_flops(),
                     "edges": len(original.edges), "junctions": len(original.junctions),
                     "trained": baseline is not None,
                     f"val_{metric}": baseline.val_metric if baseline is not None else None},
        "transformed": {"parameters": graph.total_params(), "flops_per_example": graph.total_flops(),
                        "edges": len(graph.edges), "junctions": len(graph.junctions),
                        f"val_{metric}": result.val_metric, "val_loss": result.val_loss},
        "decisions": edges,
        "arch_history": [{"epoch": h["epoch"], "stage": h["stage"], "weights": h.get("arch")} for h in history],
        "initial_weights": initial_weights,
        "history": [{k: v for k, v in h.items() if k != "arch"} for h in history],
        "time_seconds": {**timings, "mean_step": result.mean_step_seconds},
        "seed": opts.seed,
        # what `archir export DIR` rebuilds example inputs from (integer inputs keep their range)
        "example_inputs": [input_spec(x) for x in example_inputs],
        "device": str(result.device),
        "versions": _versions(),
    }
