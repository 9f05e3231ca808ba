"""Generic two-stage trainer: architecture stage, derive, network stage.

This implements the training schedule of DNAT (Kim et al., "Differentiable Neural Architecture
Transformation", sec. 3.2-3.3) without knowing anything about graphs:

1. **Architecture stage** (epochs ``[0, A)``): the supernet's weights ω and its architecture
   parameters θ are both trained. ω is stepped by SGD with momentum and weight decay; θ by Adam
   (no weight decay by default) and ``project_arch()`` is called after every θ step (for
   instance to clamp θ ≥ 0). How θ is updated is ``TrainConfig.arch_update``:

   - ``"alternate"`` (DNAT): per batch, step ω on the batch, then step θ on the *same* batch
     with the updated ω -- two forward/backward passes per batch.
   - ``"split"`` (DSO-NAS, Zhang et al., sec. 5 "split training"): ω on a batch of the weight
     part of the training set, θ on a batch of a held-out architecture part. The caller builds
     the two loaders (``split_indices`` gives a seeded disjoint split of ``split_fraction``).
   - ``"joint"``: one forward/backward pass; ω and θ are stepped from the same gradients
     (about half the cost of the other two, first-order and biased towards the training batch).

   **Weight warm-up** (``TrainConfig.warmup_epochs`` = W, counted inside the architecture
   stage): during its first W epochs only ω is stepped -- no θ pass, no θ step, no
   ``project_arch`` -- so θ stays bit-identical and the architecture decisions are not taken on
   an untrained network (DARTS-style searches with a warm-up, e.g. PC-DARTS and ProxylessNAS,
   do the same); the architecture stage then goes on as above for its remaining epochs. W = 0
   (the default) is DNAT as published.

   Each backward pass only asks autograd for the gradients it uses
   (``loss.backward(inputs=...)``): the ω pass never touches θ.grad and the θ pass never
   touches ω.grad, and autograd skips the weight-gradient kernels it does not need.

2. **Derive**: ``derive(supernet)`` returns the derived network. Its parameters are expected to
   be a subset of the supernet's parameter objects. A new SGD optimizer is built over them and
   the optimizer state (momentum buffers) of every parameter object that survived is carried
   over (``carry_optimizer_state``); new parameter objects start with fresh state.

3. **Network stage** (epochs ``[A, epochs)``): only ω of the derived network is trained; θ is
   frozen (it is in no optimizer and no backward pass asks for its gradient).

The learning rate of ω follows one cosine curve over *all* steps of both stages,
``lr_t = lr * (1 + cos(pi * t / T)) / 2`` with ``t`` the global step and ``T`` the total number
of steps; it is computed per step, so it continues across the stage switch unchanged. θ's
learning rate is constant (as in DARTS).

``train_plain`` trains an unmodified model with the same loop, optimizer and schedule (it is the
network stage alone), so baselines and transformed models are trained identically.

What is optimised and reported is a ``Task`` (``archir.task``): its loss (mean over the batch),
its metric (mean over the batch, higher is better, named ``metric_name``) and how a batch splits
into model inputs and a target. ``task=None`` is ``classification_task(cfg.label_smoothing)``:
cross-entropy and top-1 accuracy on ``(x, y)`` batches. Losses and metrics are weighted by the
batch size (the first dimension of the first tensor input) and accumulated on the device; they
are read back only for the progress bar (every ``log_every`` steps) and once per epoch. Before
the first step, ``check_task`` runs the model, the loss and the metric once on the first
training batch (eval mode, no_grad) so that a model/data/loss mismatch is one clear
``UserInputError``; with the classification task the training set's labels are checked too
when the loader exposes its ``dataset``.

Data loaders are any iterable with ``len()`` that yields batches in the conventions of
``archir.task`` (``(x, y)``, ``(x1, x2, y)``, ``{"x": x, "target": y}``); each epoch iterates
the loader once more (a loader that reshuffles on ``__iter__`` gets a new order per epoch).
Tensors in batches are moved to the device and made contiguous only when they are not already.
"""

from __future__ import annotations

import math
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from .errors import NonFiniteLoss, RunInterrupted, UserInputError
from .fileio import save_torch
from .modes import eval_mode
from .progress import Progress
from .task import Task, batch_size, check_labels, check_task, classification_task, move_to

__all__ = [
    "TrainConfig",
    "EpochRecord",
    "TrainResult",
    "train_two_stage",
    "train_plain",
    "evaluate",
    "resolve_device",
    "seed_everything",
    "split_indices",
    "carry_optimizer_state",
    "cosine_lr",
    "format_metric",
    "load_checkpoint",
]

ARCH_UPDATES = ("alternate", "split", "joint")
SCHEDULES = ("cosine", "constant")
ARCH_OPTIMIZERS = ("adam", "sgd", "method")  # method: the one the search method names (else Adam)
NAN_POLICIES = ("stop", "skip")
CHECKPOINT_FORMAT = 2
CHECKPOINT_NAME = "checkpoint.pt"
#: How the network stage starts from the derived network: ``continue`` with the searched weights
#: (their SGD state carried over, one learning-rate schedule over both stages), or ``scratch``:
#: every parameter back to its value at the start of the run (:func:`rewind`), a fresh optimiser
#: and a schedule of the network stage's own (DSO-NAS, sec. 4: "re-training the final
#: architecture from scratch").
RETRAIN_MODES = ("continue", "scratch")


# --------------------------------------------------------------------------------------------
# Configuration and results
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Hyper-parameters of ``train_two_stage`` / ``train_plain``.

    ``epochs`` counts both stages; the first ``min(arch_epochs, epochs)`` are the architecture
    stage. ``warmup_epochs`` (W, at most ``arch_epochs``) are the first epochs of the
    architecture stage, in which only ω is trained and θ does not move (see the module
    docstring); the stage then trains θ for its remaining ``arch_epochs - W`` epochs. Like the
    stage, the warm-up is cut short by ``epochs``. The default 0 keeps DNAT as published; which
    W to recommend is for a measured sweep (a later benchmark), not yet done.

    ``batch_size`` and ``split_fraction`` are not used by the trainer itself (it gets
    ready-made loaders); they travel in the config so that callers building the loaders and
    checkpoints recording the run see one set of numbers. ``label_smoothing`` applies to the
    default (classification) task only; a task given to the trainer is used as it is.
    """

    epochs: int = 10
    arch_epochs: int = 5
    warmup_epochs: int = 0
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"
    arch_lr: float = 0.05
    arch_optimizer: str = "adam"
    arch_weight_decay: float = 0.0
    arch_update: str = "alternate"
    split_fraction: float = 0.5
    device: str = "auto"
    seed: int = 0
    grad_clip: Optional[float] = 5.0
    progress: bool = True
    label_smoothing: float = 0.0
    log_every: int = 20
    deterministic: bool = False
    nan_policy: str = "stop"
    retrain: str = "continue"

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.arch_epochs < 0:
            raise ValueError(f"epochs ({self.epochs}) and arch_epochs ({self.arch_epochs}) must be >= 0")
        if not 0 <= self.warmup_epochs <= self.arch_epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be >= 0 and at most arch_epochs "
                             f"({self.arch_epochs}): the warm-up is the start of the architecture stage")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.arch_update not in ARCH_UPDATES:
            raise ValueError(f"arch_update must be one of {ARCH_UPDATES}, got {self.arch_update!r}")
        if self.arch_optimizer not in ARCH_OPTIMIZERS:
            raise ValueError(f"arch_optimizer must be one of {ARCH_OPTIMIZERS}, got {self.arch_optimizer!r}")
        if not 0.0 < self.split_fraction < 1.0:
            raise ValueError(f"split_fraction must be in (0, 1), got {self.split_fraction}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ValueError(f"device must be 'auto' or a torch device ('cpu', 'cuda', 'cuda:1'), "
                                 f"got {self.device!r}") from e
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        for name in ("lr", "arch_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.retrain not in RETRAIN_MODES:
            raise ValueError(f"retrain must be one of {RETRAIN_MODES}, got {self.retrain!r}")


def format_metric(name: str, value: Optional[float]) -> str:
    """``accuracy`` in percent (``85.20%``), any other metric with 4 significant digits."""
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}%" if name == "accuracy" else f"{value:.4g}"


@dataclass
class EpochRecord:
    """What one epoch did. ``train_metric``/``val_metric`` are the task's metric (named
    ``metric_name``; top-1 accuracy in [0, 1] for the default task), ``train_loss``/``val_loss``
    its loss, all averaged over examples. ``lr`` is ω's learning rate at the epoch's first step;
    ``seconds`` is the epoch's wall time (training + evaluation), ``train_seconds`` the training
    loop alone; ``arch`` is ``log_arch()`` after the epoch (None without ``log_arch``).

    ``warmup`` marks the weight warm-up epochs at the start of the architecture stage (their
    ``stage`` stays "arch"); ``arch_stepped`` says whether θ was stepped in the epoch (False in
    warm-up and network epochs, and without θ). ``changed_edges``/``searchable_edges``: after an
    architecture-stage epoch, the ids of the edges whose leading choice differs from the original
    operations, and the number of searchable edges (``log_changes()``; None otherwise)."""

    epoch: int
    stage: str  # "arch" | "net"
    train_loss: float
    train_metric: float
    val_loss: Optional[float]
    val_metric: Optional[float]
    lr: float
    steps: int
    seconds: float
    train_seconds: float
    arch: Optional[dict] = None
    metric_name: str = "accuracy"
    warmup: bool = False
    arch_stepped: bool = False
    changed_edges: Optional[list] = None
    searchable_edges: Optional[int] = None
    skipped_steps: int = 0

    def summary(self, epochs: int) -> str:
        """One log line: stage (``arch warm-up`` in warm-up epochs), 1-based epoch of ``epochs``,
        train (and val) loss and metric, lr, seconds, and ``changed k/n`` edges when logged."""
        name = self.metric_name
        val = ("" if self.val_metric is None else
               f" val loss {self.val_loss:.4f} {name} {format_metric(name, self.val_metric)}")
        changed = ("" if self.changed_edges is None else
                   f" changed {len(self.changed_edges)}/{self.searchable_edges}")
        stage = f"{self.stage} warm-up" if self.warmup else self.stage
        return (f"[{stage}] epoch {self.epoch + 1}/{epochs} train loss {self.train_loss:.4f} "
                f"{name} {format_metric(name, self.train_metric)}{val} lr {self.lr:.4g} "
                f"{self.seconds:.1f}s{changed}")


@dataclass
class TrainResult:
    """Outcome of a run.

    ``network`` is the final model (the derived network, or the supernet when ``derive`` is
    None) in eval mode. ``stage_seconds`` / ``stage_steps`` / ``mean_step_seconds`` are keyed by
    stage ("arch", "net") and cover the training loops only (evaluation is in
    ``eval_seconds``); a step is one training batch (two passes in "alternate"/"split" mode).
    ``optimizer`` is the last ω optimizer (the network stage's one after a derive).
    ``carried_state`` counts the parameters whose optimizer state survived the derive.
    ``val_loss``/``val_metric`` are the final network's validation loss and metric (named
    ``metric_name``), None without a validation loader.
    """

    network: nn.Module
    history: list[dict]
    val_loss: Optional[float]
    val_metric: Optional[float]
    metric_name: str
    stage_seconds: dict[str, float]
    stage_steps: dict[str, int]
    mean_step_seconds: dict[str, Optional[float]]
    eval_seconds: float
    derive_seconds: float
    carried_state: int
    initial_arch: Optional[dict]
    final_arch: Optional[dict]
    optimizer: Optional[torch.optim.Optimizer]
    device: str


# --------------------------------------------------------------------------------------------
# Small public helpers
# --------------------------------------------------------------------------------------------


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu. Asking for cuda without CUDA is an error."""
    spec = str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {spec!r} was requested but CUDA is not available "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
            "use device='cpu' or 'auto'")
    return dev


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's (all devices') random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def split_indices(n: int, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A seeded disjoint split of ``range(n)`` for "split" mode: ``(weight_idx, arch_idx)``,
    with ``round(n * fraction)`` indices (at least one each) held out for the θ updates."""
    if n < 2:
        raise ValueError(f"cannot split {n} samples into two non-empty parts")
    k = min(max(1, round(n * fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[k:].sort().values, perm[:k].sort().values


def cosine_lr(base: float, step: int, total: int) -> float:
    """``base * (1 + cos(pi * step / total)) / 2``: ``base`` at step 0, decaying towards 0."""
    if total <= 0:
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def initial_values(model: nn.Module) -> dict[int, Tensor]:
    """A cpu copy of every parameter of ``model`` keyed by the parameter object's id: the values
    :func:`rewind` restores (derive keeps the parameter objects it keeps)."""
    return {id(p): p.detach().to("cpu", copy=True) for p in model.parameters()}


def rewind(model: nn.Module, initial: dict[int, Tensor], seed: int) -> list[str]:
    """Restart ``model`` from scratch: every parameter found in ``initial``
    (:func:`initial_values` of the model the run started with) gets its value from there (the
    user's own initialisation scheme, or ``--from-weights``, kept); a module holding parameters
    that are not is re-initialised by its ``reset_parameters`` (seeded with ``seed``); every
    BatchNorm's running statistics start again. Returns the names of modules whose parameters
    could be neither restored nor reset (kept as they are)."""
    torch.manual_seed(seed + 7919)  # a stream of its own, repeatable
    kept = []
    with torch.no_grad():
        for name, module in model.named_modules():
            own = list(module.parameters(recurse=False))
            if own and all(id(p) in initial for p in own):
                for p in own:
                    p.copy_(initial[id(p)])
            elif own:
                reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
                if callable(reset):  # (MultiheadAttention's is private)
                    reset()
                else:
                    kept.append(name or type(module).__name__)
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
                module.reset_running_stats()
    return kept


def carry_optimizer_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> int:
    """Copy ``old``'s per-parameter state (momentum buffers, ...) to ``new`` for every parameter
    object the two optimizers share; returns how many were carried. The state tensors are
    shared, not copied (the old optimizer is discarded)."""
    new_params = {id(p): p for group in new.param_groups for p in group["params"]}
    carried = 0
    for p, state in old.state.items():
        if id(p) in new_params and state:
            new.state[new_params[id(p)]] = state
            carried += 1
    return carried


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device | None = None,
             task: Optional[Task] = None) -> tuple[float, float]:
    """``(mean loss, mean metric)`` of ``model`` over ``loader`` for ``task`` (default: the
    classification task, i.e. cross-entropy and top-1 accuracy), both weighted by batch size,
    in eval mode under ``torch.no_grad`` (the model's previous train/eval mode is restored).
    ``device`` defaults to the device of the model's first parameter (cpu for a parameterless
    model). An empty loader gives ``(nan, nan)``."""
    task = classification_task() if task is None else task
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    metric_sum = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    with eval_mode(model):
        for batch in loader:
            args, kwargs, target = move_to(task.split_batch(batch), device)
            out = model(*args, **kwargs)
            n_b = batch_size(args, kwargs, target)
            loss_b = task.total_loss(out, target, n_b, device)
            loss_sum += loss_b
            metric_sum += task.total_metric(out, target, n_b, device, loss_total=loss_b)
            n += n_b
    if n == 0:
        return float("nan"), float("nan")
    return loss_sum.item() / n, metric_sum.item() / n


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def train_plain(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Optional[Iterable],
    cfg: TrainConfig,
    *,
    on_epoch: Optional[Callable[[EpochRecord], None]] = None,
    checkpoint_dir: Optional[Path | str] = None,
    task: Optional[Task] = None,
) -> TrainResult:
    """Ordinary training of ``model`` (all its parameters are ω) with the same loop, optimizer
    and schedule as the network stage of ``train_two_stage``: a baseline run. ``arch_epochs``
    and the θ settings of ``cfg`` are ignored; every epoch is recorded with stage "net".
    ``task``: see ``train_two_stage``."""
    plain = TrainConfig(**{**asdict(cfg), "arch_epochs": 0, "warmup_epochs": 0})
    return train_two_stage(model, [], train_loader, val_loader, plain, derive=None,
                           on_epoch=on_epoch, checkpoint_dir=checkpoint_dir, task=task)


def train_two_stage(
    supernet: nn.Module,
    arch_params: Sequence[nn.Parameter],
    train_loader: Iterable,
    val_loader: Optional[Iterable],
    cfg: TrainConfig,
    *,
    derive: Optional[Callable[[nn.Module], nn.Module]],
    arch_loader: Optional[Iterable] = None,
    net_loader: Optional[Iterable] = None,
    project_arch: Optional[Callable[[], None]] = None,
    extra_loss: Optional[Callable[[nn.Module], Tensor]] = None,
    on_epoch: Optional[Callable[[EpochRecord], None]] = None,
    checkpoint_dir: Optional[Path | str] = None,
    log_arch: Optional[Callable[[], dict]] = None,
    log_changes: Optional[Callable[[], tuple[Sequence[str], int]]] = None,
    task: Optional[Task] = None,
    arch_optimizer: Optional[Callable[[list, float], Optional[torch.optim.Optimizer]]] = None,
    resume: Optional[dict] = None,
    checkpoint_meta: Optional[dict] = None,
    extra_state: Optional[tuple[Callable[[], Any], Callable[[Any], None]]] = None,
) -> TrainResult:
    """Train ``supernet`` and θ (``arch_params``) for ``min(cfg.arch_epochs, cfg.epochs)``
    epochs, call ``derive(supernet)``, and train the derived network's ω for the remaining
    epochs. See the module docstring for the method; the first ``cfg.warmup_epochs`` epochs
    of the architecture stage step ω only (weight warm-up).

    All random generators are seeded with ``cfg.seed`` at the start; build the supernet after
    ``torch.manual_seed(cfg.seed)`` (or ``seed_everything``) too if its initial weights should
    repeat. On CPU the same seed then gives bit-identical weights and history.

    Args:
        supernet: the model of the architecture stage. θ may or may not be registered in it;
            ω is every other parameter of it that requires grad.
        arch_params: θ. Moved to the device (keeping the objects) if the supernet does not hold
            them.
        train_loader: batches (``(x, y)``, ``(x1, x2, y)``, ``{"x": x, "target": y}``: see
            ``archir.task``), iterated once per epoch. In "split" mode it is the weight part of
            the training set (ω steps).
        val_loader: evaluated after every epoch (may be None: no evaluation).
        derive: called once after the architecture stage (at the start when it has no epochs,
            and even when ``cfg.epochs == 0``); returns the network of the network stage. None:
            keep training the supernet (θ frozen) in the network stage.
        arch_loader: "split" mode only, required there: the held-out part for θ steps. It is
            cycled independently of ``train_loader``; an epoch is ``len(train_loader)`` steps.
        net_loader: the loader of the network stage (default ``train_loader``). In "split" mode
            pass the whole training set here so the network stage sees all of it.
        project_arch: called (under no_grad) after every θ step, e.g. to clamp θ >= 0.
        extra_loss: ``extra_loss(supernet)`` is added to the loss whose gradient updates θ (the
            θ pass in "alternate"/"split", the single pass in "joint"), architecture stage only;
            e.g. a sparsity penalty on θ.
        on_epoch: called with each ``EpochRecord``.
        checkpoint_dir: if given, ``checkpoint_dir/checkpoint.pt`` is rewritten atomically after
            every epoch with the state of the model trained in that epoch: the supernet's
            ``state_dict`` after an "arch" epoch, the derived network's after a "net" epoch
            (``"stage"`` says which; then also the supernet as it was at the derive), plus θ,
            the optimizer states, epoch, stage, config, history, the global step, and the
            random generators' states (python, numpy, torch, and each loader's own). On SIGINT
            or SIGTERM the run finishes its current step, writes the checkpoint there (with the
            loaders' states at the epoch's start and the step count, so a resume replays the
            epoch's first batches without training on them) and raises
            :class:`~archir.errors.RunInterrupted`. It loads with ``weights_only=True``.
        resume: a checkpoint (:func:`load_checkpoint`) to continue from. Built with the same
            seed, supernet, loaders and config, the run then ends bit for bit as an
            uninterrupted one on CPU: the network stage is re-derived from the saved supernet
            and θ before its state is loaded.
        checkpoint_meta: stored as ``meta`` in every checkpoint (the pipeline's options, which
            a resume compares).
        extra_state: ``(get, set)``: ``get()`` (tensors and plain values) is saved in every
            checkpoint and given back to ``set`` on resume, before anything else is restored:
            state outside the parameters and optimisers that the run depends on (a search
            method's own, e.g. DSO-NAS's FLOPs-budget controller).
        log_arch: returns a snapshot of θ (e.g. per edge) stored (copied: tensors are cloned to
            the cpu) in every ``EpochRecord``, and before training in ``initial_arch``.
        log_changes: called after every architecture-stage epoch (warm-up included); returns
            ``(ids of the edges whose leading choice is no longer the original, number of
            searchable edges)``, stored as ``changed_edges`` (sorted) and ``searchable_edges``
            in the ``EpochRecord`` and printed as ``changed k/n`` in its line.
        arch_optimizer: with ``cfg.arch_optimizer == "method"``, ``arch_optimizer(θ, cfg.arch_lr)``
            builds θ's optimiser (the search method's own, e.g. DSO-NAS's APG-NAG); None, or
            an answer of None, falls back to Adam.
        task: the loss, metric and batch layout (``archir.task.Task``). None: the
            classification task, ``classification_task(cfg.label_smoothing)`` for training; its
            validation loss is plain cross-entropy (no label smoothing), as it always was.
    """
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None  # made at the first checkpoint

    arch_params = _unique(arch_params)
    arch_ids = {id(p) for p in arch_params}
    epochs = cfg.epochs
    arch_epochs = min(cfg.arch_epochs, epochs)
    warmup_epochs = min(cfg.warmup_epochs, arch_epochs)
    if cfg.arch_update == "split" and arch_epochs > 0 and arch_params and arch_loader is None:
        raise ValueError(
            "arch_update='split' needs arch_loader, the held-out part of the training set for the "
            "θ steps (e.g. two loaders over split_indices(n, cfg.split_fraction, cfg.seed))")
    net_loader = train_loader if net_loader is None else net_loader
    loaders = {"train": train_loader, "arch": arch_loader, "net": net_loader}

    # scratch: the derived network restarts from the weights the run started with
    initial = initial_values(supernet) if cfg.retrain == "scratch" and derive is not None else {}
    supernet.to(device)
    with torch.no_grad():
        for p in arch_params:  # θ the supernet does not register: move in place (same object)
            if p.device != device:
                p.data = p.data.to(device)

    if task is None:
        train_task, eval_task = classification_task(cfg.label_smoothing), classification_task()
    else:
        train_task = eval_task = task
    total_steps = (arch_epochs * len(train_loader) + (epochs - arch_epochs) * len(net_loader)) if epochs else 0
    clock = _Clock()
    from . import distributed

    world = distributed.current()
    state = _RunState(cfg=cfg, device=device, total_steps=total_steps, task=train_task, world=world)
    net_start = arch_epochs * len(train_loader) if epochs else 0  # the network stage's first step
    if cfg.retrain == "scratch":  # each stage its own schedule: the network stage is a new run
        state.schedule_steps = net_start
    writes = ckpt_dir is not None and (world is None or world.is_writer)  # only rank 0 writes
    snapshot = (lambda: _snapshot(log_arch())) if log_arch is not None else (lambda: None)
    initial_arch = snapshot()

    model = supernet
    opt_w = _sgd(_weights(supernet, arch_ids), cfg)
    opt_a = _arch_optimizer(arch_params, cfg, arch_optimizer) if arch_params and arch_epochs > 0 else None
    carried = 0
    derived = False
    supernet_at_derive: Optional[dict] = None  # what a network-stage checkpoint re-derives from

    def do_derive() -> None:
        nonlocal model, opt_w, carried, derived, supernet_at_derive
        derived = True
        if opt_a is not None:
            opt_a.zero_grad(set_to_none=True)  # θ is frozen from here on
        if derive is None:
            return
        t0 = time.perf_counter()
        if world is not None:  # every rank derives from rank 0's supernet and θ
            world.broadcast_module(supernet, arch_params)
        # derive trains nothing further into the supernet: keep it as it is now for the network
        # stage's checkpoints (a whole copy of the weights: only when such a checkpoint can come)
        if ckpt_dir is not None and epochs > arch_epochs:
            supernet_at_derive = {k: v.detach().to("cpu", copy=True) for k, v in supernet.state_dict().items()}
        network = derive(supernet)
        network.to(device)
        if world is not None:
            world.check_same("architecture", _fingerprint(network))
        if cfg.retrain == "scratch":  # (a resumed run then loads the checkpoint's weights over these)
            rewind(network, initial, cfg.seed)
            initial.clear()
            state.schedule_start, state.schedule_steps = net_start, total_steps - net_start
        new_opt = _sgd(_weights(network, arch_ids), cfg)
        if cfg.retrain == "continue":
            carried = carry_optimizer_state(opt_w, new_opt)
        model, opt_w = network, new_opt
        clock.derive += time.perf_counter() - t0

    def save(epoch: int, next_epoch: int, step: int, loader_states: dict, partial: Optional[dict]) -> Path:
        path = ckpt_dir / CHECKPOINT_NAME
        if not writes:
            state.last_checkpoint = (str(path), epoch if step == 0 else None)
            return path
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _save_checkpoint(path, model=model, opt_w=opt_w, opt_a=opt_a if not derived else None,
                         arch_params=arch_params, epoch=epoch, stage="net" if derived else "arch", cfg=cfg,
                         history=state.history, next_epoch=next_epoch, step=step, loader_states=loader_states,
                         partial=partial, global_step=state.global_step, derived=derived,
                         supernet_at_derive=supernet_at_derive if derived else None, meta=checkpoint_meta,
                         extra=extra_state[0]() if extra_state is not None else None)
        state.last_checkpoint = (str(path), epoch if step == 0 else None)
        return path

    start_epoch, skip_steps, partial = 0, 0, None
    if resume is not None:
        start_epoch, skip_steps, partial = int(resume["next_epoch"]), int(resume["step"]), resume.get("partial")
        if extra_state is not None and resume.get("extra") is not None:
            extra_state[1](resume["extra"])
        if resume["derived"]:  # re-derive from the supernet and θ as they were, then load the network
            supernet.load_state_dict(resume["supernet_at_derive"])
            _load_arch(arch_params, resume["arch_params"])
            do_derive()
            model.load_state_dict(resume["model"])
            opt_w.load_state_dict(resume["optimizer"])
        else:
            supernet.load_state_dict(resume["model"])
            _load_arch(arch_params, resume["arch_params"])
            opt_w.load_state_dict(resume["optimizer"])
            if opt_a is not None and resume.get("arch_optimizer") is not None:
                opt_a.load_state_dict(resume["arch_optimizer"])
        state.global_step = int(resume["global_step"])
        state.history = list(resume["history"])
        _set_loader_states(loaders, resume["loaders"])
        _set_rng_state(resume["rng"])
        if ckpt_dir is not None:
            state.last_checkpoint = (str(ckpt_dir / CHECKPOINT_NAME), resume["epoch"] if not skip_steps else None)

    with _deterministic(cfg.deterministic), _stop_on_signals(state, enabled=ckpt_dir is not None or world is not None):
        for epoch in range(start_epoch, epochs):
            arch_stage = epoch < arch_epochs
            if not arch_stage and not derived:
                do_derive()
            stage = "arch" if arch_stage else "net"
            warmup = arch_stage and epoch < warmup_epochs  # ω only: θ must not move
            w_params = _param_list(opt_w)
            if warmup:
                step = _net_step(model, w_params, opt_w, state)
            elif arch_stage:
                step = _arch_step(model, w_params, arch_params, opt_w, opt_a, state,
                                  cfg.arch_update, arch_loader, project_arch, extra_loss)
            else:
                step = _net_step(model, w_params, opt_w, state)
            loader = train_loader if arch_stage else net_loader
            skip = skip_steps if epoch == start_epoch else 0
            epoch_states = _loader_states(loaders)  # at the epoch's start: a mid-epoch resume replays from here
            state.epoch, state.stage = epoch, stage

            def interrupted(steps_done: int, sums: dict, epoch=epoch, epoch_states=epoch_states,
                            n_steps=len(loader)) -> None:
                path = save(epoch, epoch, steps_done, epoch_states, sums) if ckpt_dir is not None else None
                _raise_interrupted(state, epoch, epochs, f"after step {steps_done} of {n_steps}", path)

            t0 = time.perf_counter()
            lr0 = state.lr_at(state.global_step - skip)
            label = f"{stage} warm-up" if warmup else stage
            train_loss, train_metric, steps, skipped, resumed_seconds = _run_epoch(
                model, loader, step, opt_w, state, desc=f"{label} {epoch + 1}/{epochs}", skip=skip,
                partial=partial if skip else None, on_interrupt=interrupted)
            train_seconds = time.perf_counter() - t0 + resumed_seconds
            clock.add(stage, train_seconds, steps)

            t1 = time.perf_counter()
            val_loss, val_metric = (evaluate(model, val_loader, device, eval_task) if val_loader is not None
                                    else (None, None))
            clock.eval += time.perf_counter() - t1

            record = EpochRecord(epoch=epoch, stage=stage, train_loss=train_loss, train_metric=train_metric,
                                 val_loss=val_loss, val_metric=val_metric, lr=lr0, steps=steps,
                                 seconds=time.perf_counter() - t0 + resumed_seconds, train_seconds=train_seconds,
                                 arch=snapshot(), metric_name=train_task.metric_name, warmup=warmup,
                                 arch_stepped=arch_stage and not warmup and opt_a is not None and steps > 0,
                                 skipped_steps=skipped)
            if arch_stage and log_changes is not None:
                changed, searchable = log_changes()
                record.changed_edges, record.searchable_edges = sorted(changed), int(searchable)
            state.history.append(asdict(record))
            if cfg.progress:
                tqdm.write(record.summary(epochs))
            if on_epoch is not None:
                on_epoch(record)
            if world is not None:  # a signal during evaluation: every rank stops here, or none
                state.stop_agreed = world.sum(float(state.stop_signal is not None))[0] > 0
            if ckpt_dir is not None:
                path = save(epoch, epoch + 1, 0, _loader_states(loaders), None)
                if state.stopping():  # arrived during evaluation: this is the step boundary
                    _raise_interrupted(state, epoch, epochs, "at its end", path)
            elif state.stopping():
                _raise_interrupted(state, epoch, epochs, "at its end", None)

        derived_last = not derived
        if derived_last:  # all epochs were architecture epochs, or there were none
            do_derive()

    if (derived_last and derive is not None) or not state.history:
        # the returned network has not been evaluated yet
        t1 = time.perf_counter()
        final = evaluate(model, val_loader, device, eval_task) if val_loader is not None else (None, None)
        clock.eval += time.perf_counter() - t1
    else:
        final = (state.history[-1]["val_loss"], state.history[-1]["val_metric"])
    model.eval()
    return TrainResult(
        network=model, history=state.history, val_loss=final[0], val_metric=final[1],
        metric_name=train_task.metric_name,
        stage_seconds=dict(clock.seconds), stage_steps=dict(clock.steps),
        mean_step_seconds={k: (clock.seconds[k] / clock.steps[k] if clock.steps[k] else None)
                           for k in clock.seconds},
        eval_seconds=clock.eval, derive_seconds=clock.derive, carried_state=carried,
        initial_arch=initial_arch, final_arch=snapshot(),
        optimizer=opt_w, device=str(device))


# --------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------


@dataclass
class _RunState:
    cfg: TrainConfig
    device: torch.device
    total_steps: int
    task: Task
    global_step: int = 0
    history: list = field(default_factory=list)
    checked: bool = False  # check_task ran on the first training batch
    epoch: int = 0
    stage: str = "arch"
    step_in_epoch: int = 0
    stop_signal: Optional[int] = None  # SIGINT/SIGTERM received: stop at the next step boundary
    last_checkpoint: Optional[tuple] = None  # (path, epoch it ends, or None when mid-epoch)
    skipped: int = 0  # steps dropped by nan_policy="skip" in the current epoch
    world: Any = None  # archir.distributed.World of a multi-process run (None: one process)
    weight: float = 1.0  # this rank's share of the current global batch (distributed runs)
    stop_agreed: bool = False  # some rank got SIGINT/SIGTERM (distributed runs: all stop together)

    def stopping(self) -> bool:
        return self.stop_agreed if self.world is not None else self.stop_signal is not None
    schedule_start: int = 0  # the step where the learning-rate schedule (re)starts
    schedule_steps: int | None = None  # its length (None: total_steps)

    def lr_at(self, step: int) -> float:
        if self.cfg.schedule == "constant":
            return self.cfg.lr
        span = self.total_steps if self.schedule_steps is None else self.schedule_steps
        return cosine_lr(self.cfg.lr, step - self.schedule_start, span)


@dataclass
class _Clock:
    seconds: dict = field(default_factory=lambda: {"arch": 0.0, "net": 0.0})
    steps: dict = field(default_factory=lambda: {"arch": 0, "net": 0})
    eval: float = 0.0
    derive: float = 0.0

    def add(self, stage: str, seconds: float, steps: int) -> None:
        self.seconds[stage] += seconds
        self.steps[stage] += steps


def _snapshot(obj: Any) -> Any:
    """A copy of ``log_arch()``'s answer that later θ updates cannot change: tensors are
    detached, cloned and moved to the cpu; dicts, lists and tuples are copied."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_snapshot(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _weights(model: nn.Module, arch_ids: set[int]) -> list[nn.Parameter]:
    """ω: the model's trainable parameters that are not θ (in registration order)."""
    return [p for p in _unique(model.parameters()) if p.requires_grad and id(p) not in arch_ids]


def _param_list(opt: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in opt.param_groups for p in group["params"]]


def _sgd(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.SGD:
    if not params:
        raise ValueError("the model has no trainable weight parameters (ω) to train")
    # foreach: one fused call per update instead of a Python loop over tensors (torch picks it
    # only for CUDA by default); on a CPU the loop over many small tensors is what costs
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov, foreach=True)


def _arch_optimizer(params: list[nn.Parameter], cfg: TrainConfig, factory=None) -> torch.optim.Optimizer:
    if cfg.arch_optimizer == "method" and factory is not None:
        opt = factory(params, cfg.arch_lr)
        if opt is not None:
            return opt
    if cfg.arch_optimizer in ("adam", "method"):  # dozens of 3-element θ: a per-tensor loop would dominate
        return torch.optim.Adam(params, lr=cfg.arch_lr, weight_decay=cfg.arch_weight_decay, foreach=True)
    return torch.optim.SGD(params, lr=cfg.arch_lr, momentum=cfg.momentum, weight_decay=cfg.arch_weight_decay,
                           foreach=True)


def _cycle(loader: Iterable) -> Iterator:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("arch_loader yields no batches")


def _clip(params: list[nn.Parameter], cfg: TrainConfig) -> Optional[Tensor]:
    """Clip the gradients' total norm to ``cfg.grad_clip``; returns the norm before clipping."""
    if cfg.grad_clip is not None:
        return nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
    return None


def _reduce(loss: Tensor, params: list[nn.Parameter], state: _RunState) -> Tensor | bool:
    """After a backward pass: whether the loss is finite (a tensor, read later). In a distributed
    run the pass's gradients are averaged over the ranks here (:meth:`World.average_gradients`),
    with every rank's "loss not finite" and "signal received" flags: the answer is then whether
    the loss was finite on every rank, and ``state.stop_agreed`` whether any rank was signalled."""
    if state.world is None:
        return torch.isfinite(loss.detach()).all()
    bad = 0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0
    flags = state.world.average_gradients(params, state.weight, [bad, float(state.stop_signal is not None)])
    state.stop_agreed = state.stop_agreed or flags[1] > 0
    return flags[0] == 0


def _fingerprint(network: nn.Module) -> str:
    """What must be equal on every rank after a derive: the network's code (a GraphModule's) or
    its module tree, and its parameter and buffer shapes."""
    shapes = [(k, tuple(v.shape)) for k, v in network.state_dict().items()]
    return f"{getattr(network, 'code', None) or network!r}\n{shapes}"


def _finite(ok: Tensor | bool, norm: Optional[Tensor], state: _RunState, what: str, loss: Tensor) -> bool:
    """Whether a pass may step: ``ok`` (its loss finite, on every rank; :func:`_reduce`) and the
    gradients' norm finite when clipping computed it. Otherwise ``nan_policy="stop"`` raises
    :class:`NonFiniteLoss` naming the epoch and step and the last good checkpoint (nothing is
    written after it); ``"skip"`` counts the step in ``state.skipped`` and returns False (the
    caller drops the update). One host sync per pass."""
    ok = torch.as_tensor(ok)
    if norm is not None:
        ok = ok & torch.isfinite(norm)
    if bool(ok):
        return True
    if state.cfg.nan_policy == "skip":
        state.skipped += 1
        return False
    value = float(loss.detach().reshape(-1)[0]) if loss.numel() else float("nan")
    cause = f"{what} became {value}" if not math.isfinite(value) else f"the gradients of {what} became infinite"
    kept = ""
    if state.last_checkpoint is not None:
        path, ep = state.last_checkpoint
        kept = (f"; the last good checkpoint ({'after epoch ' + str(ep + 1) if ep is not None else 'mid-epoch'}) "
                f"is kept at {path}")
    raise NonFiniteLoss(f"{cause} in epoch {state.epoch + 1} ({state.stage} stage), step {state.step_in_epoch + 1}"
                        f"{kept}; lower --lr ({state.cfg.lr}) or --arch-lr ({state.cfg.arch_lr}), or pass "
                        "--nan-policy skip to drop such steps")


# A step gets one batch already split and on the device: (args, kwargs, target); it returns the
# loss and the model output of its ω pass.
StepFn = Callable[[tuple, dict, Any], tuple[Tensor, Any]]


def _net_step(model: nn.Module, w_params: list[nn.Parameter], opt_w: torch.optim.Optimizer,
              state: _RunState) -> StepFn:
    """One SGD step of ω; returns (loss, output) of the batch."""
    loss_fn = state.task.loss

    def step(args: tuple, kwargs: dict, target: Any) -> tuple[Optional[Tensor], Any]:
        out = model(*args, **kwargs)
        loss = loss_fn(out, target)
        opt_w.zero_grad(set_to_none=True)
        loss.backward(inputs=w_params)
        ok = _reduce(loss, w_params, state)
        norm = _clip(w_params, state.cfg)
        if not _finite(ok, norm, state, "the loss", loss):
            opt_w.zero_grad(set_to_none=True)
            return None, None
        opt_w.step()
        return loss, out

    return step


def _arch_step(model: nn.Module, w_params: list[nn.Parameter], arch_params: list[nn.Parameter],
               opt_w: torch.optim.Optimizer, opt_a: Optional[torch.optim.Optimizer], state: _RunState,
               mode: str, arch_loader: Optional[Iterable], project_arch: Optional[Callable[[], None]],
               extra_loss: Optional[Callable[[nn.Module], Tensor]]) -> StepFn:
    """One step of the architecture stage (see the module docstring for the three modes);
    returns (loss, output) of the ω pass."""
    net_step = _net_step(model, w_params, opt_w, state)
    if opt_a is None:  # no θ: the architecture stage only trains ω
        return net_step
    task = state.task

    def arch_update() -> None:
        opt_a.step()
        if project_arch is not None:
            with torch.no_grad():
                project_arch()

    def theta_pass(args: tuple, kwargs: dict, target: Any) -> None:
        loss = task.loss(model(*args, **kwargs), target)
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        opt_a.zero_grad(set_to_none=True)
        loss.backward(inputs=arch_params)
        if not _finite(_reduce(loss, arch_params, state), None, state, "the architecture loss", loss):
            opt_a.zero_grad(set_to_none=True)
            return
        arch_update()

    if mode == "alternate":
        def step(args: tuple, kwargs: dict, target: Any) -> tuple[Tensor, Any]:
            result = net_step(args, kwargs, target)
            if result[0] is not None:
                theta_pass(args, kwargs, target)
            return result
        return step

    if mode == "split":
        held_out = _cycle(arch_loader)

        def step(args: tuple, kwargs: dict, target: Any) -> tuple[Tensor, Any]:
            result = net_step(args, kwargs, target)
            batch = next(held_out)
            if result[0] is not None:
                weight = state.weight
                if state.world is not None:
                    batch, state.weight = state.world.shard(batch)
                theta_pass(*move_to(task.split_batch(batch), state.device))
                state.weight = weight
            return result
        step.replay = lambda: next(held_out)  # a resumed epoch draws the held-out batches it skips
        return step

    both = w_params + arch_params

    def step(args: tuple, kwargs: dict, target: Any) -> tuple[Tensor, Any]:  # joint
        out = model(*args, **kwargs)
        loss = task.loss(out, target)
        total = loss + extra_loss(model) if extra_loss is not None else loss
        opt_w.zero_grad(set_to_none=True)
        opt_a.zero_grad(set_to_none=True)
        total.backward(inputs=both)
        ok = _reduce(total, both, state)
        norm = _clip(w_params, state.cfg)
        if not _finite(ok, norm, state, "the loss", total):
            opt_w.zero_grad(set_to_none=True)
            opt_a.zero_grad(set_to_none=True)
            return None, None
        opt_w.step()
        arch_update()
        return loss, out
    return step


def _preflight(model: nn.Module, loader: Iterable, batch: Any, state: _RunState) -> None:
    """``check_task`` on the run's first training batch (and, for the classification task,
    ``check_labels`` on the loader's data set when it exposes one)."""
    num_classes = check_task(model, batch, state.task, state.device)
    dataset = getattr(loader, "dataset", None)
    if num_classes is not None and dataset is not None:
        check_labels(dataset, num_classes)
    state.checked = True


def _run_epoch(model: nn.Module, loader: Iterable, step: StepFn, opt_w: torch.optim.Optimizer,
               state: _RunState, desc: str, skip: int = 0, partial: Optional[dict] = None,
               on_interrupt: Optional[Callable[[int, dict], None]] = None
               ) -> tuple[float, float, int, int, float]:
    """Iterate ``loader`` once calling ``step`` per batch; returns (mean loss, mean metric,
    steps, steps skipped for a non-finite loss, training seconds of a resumed epoch's first
    part). Loss and metric are accumulated on the device and read back only every
    ``log_every`` steps for the progress bar (when shown) and once at the end.

    ``skip``: a resumed epoch's first ``skip`` batches are drawn (so the loader's generator
    moves as it did) but not trained on; ``partial`` holds their sums. Before each step, a
    pending SIGINT/SIGTERM calls ``on_interrupt(steps done, sums)``, which does not return."""
    cfg, device, task = state.cfg, state.device, state.task
    name = task.metric_name
    model.train()
    partial = partial or {}
    loss_sum = torch.tensor(float(partial.get("loss_sum", 0.0)), dtype=torch.float64, device=device)
    metric_sum = torch.tensor(float(partial.get("metric_sum", 0.0)), dtype=torch.float64, device=device)
    n, steps = int(partial.get("n", 0)), 0
    state.skipped = int(partial.get("skipped", 0))
    resumed_seconds = float(partial.get("train_seconds", 0.0))
    t0 = time.perf_counter()
    # a bar on a terminal, plain lines at a steady interval in a log (archir.progress)
    bar = Progress(loader, total=len(loader), desc=desc, enabled=cfg.progress, items_per_step=cfg.batch_size)
    try:
        for batch in bar:
            if steps < skip:  # replay: the run being resumed trained on this batch already
                if hasattr(step, "replay"):
                    step.replay()
                steps += 1
                continue
            if state.stopping() and on_interrupt is not None:
                on_interrupt(steps, {"loss_sum": loss_sum.item(), "metric_sum": metric_sum.item(), "n": n,
                                     "skipped": state.skipped,
                                     "train_seconds": resumed_seconds + time.perf_counter() - t0})
            if state.world is not None:  # this rank's slice of the global batch
                batch, state.weight = state.world.shard(batch)
            if not state.checked:
                _preflight(model, loader, batch, state)
            state.step_in_epoch = steps
            args, kwargs, target = move_to(task.split_batch(batch), device)
            # a rank's share of the global batch (a batch smaller than the world is used whole by all)
            n_b = state.weight if state.world is not None else batch_size(args, kwargs, target)
            lr = state.lr_at(state.global_step)
            for group in opt_w.param_groups:
                group["lr"] = lr
            loss, out = step(args, kwargs, target)
            steps += 1
            state.global_step += 1
            if loss is None or n_b == 0:  # nan_policy="skip" (no update), or a rank without examples
                continue
            loss_b = (loss.detach() if loss.dim() == 0 else loss.detach().reshape(())).double() * n_b
            loss_sum += loss_b
            with torch.no_grad():
                metric_sum += task.total_metric(out, target, n_b, device, loss_total=loss_b)
            n += n_b
            if not bar.disable and steps % cfg.log_every == 0:
                bar.set_postfix({"loss": f"{loss_sum.item() / n:.4f}",
                                 name: format_metric(name, metric_sum.item() / n), "lr": f"{lr:.4g}"},
                                refresh=False)
    finally:
        bar.close()
    if state.world is not None:  # the epoch's means over the global batches
        loss_total, metric_total, n = state.world.sum(loss_sum.item(), metric_sum.item(), float(n))
        loss_sum, metric_sum, n = torch.tensor(loss_total), torch.tensor(metric_total), int(n)
    if state.skipped and state.skipped == steps and steps:
        raise NonFiniteLoss(f"every step of epoch {state.epoch + 1} ({state.stage} stage) had a non-finite loss "
                            f"and was skipped (--nan-policy skip): the weights no longer recover; lower --lr "
                            f"({cfg.lr}) or --arch-lr ({cfg.arch_lr})")
    if n == 0:
        return float("nan"), float("nan"), steps, state.skipped, resumed_seconds
    return loss_sum.item() / n, metric_sum.item() / n, steps, state.skipped, resumed_seconds


@contextmanager
def _deterministic(enabled: bool):
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` for the run, restored after.
    Not needed on CPU (same seed, same machine, same thread count -> bit-identical already); on
    CUDA it also wants ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` set before CUDA starts."""
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    prev_bench = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = prev_bench


def _rng_state() -> dict:
    """The torch, numpy and python generator states in types ``torch.load(weights_only=True)``
    accepts: tensors, ints, floats, strings, lists (``_set_rng_state`` restores them)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [int(version), [int(v) for v in internal], None if gauss_next is None else float(gauss_next)],
    }


def _set_rng_state(rng: dict) -> None:
    """Restore the generator states saved by ``_rng_state``."""
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _save_checkpoint(path: Path, *, model: nn.Module, opt_w: torch.optim.Optimizer,
                     opt_a: Optional[torch.optim.Optimizer], arch_params: list[nn.Parameter],
                     epoch: int, stage: str, cfg: TrainConfig, history: list, next_epoch: int = 0, step: int = 0,
                     loader_states: Optional[dict] = None, partial: Optional[dict] = None, global_step: int = 0,
                     derived: bool = False, supernet_at_derive: Optional[dict] = None,
                     meta: Optional[dict] = None, extra: Any = None) -> None:
    """Write the checkpoint atomically (``archir.fileio.save_torch``). It holds tensors and
    plain python values only, so ``torch.load(path, weights_only=True)`` reads it. ``next_epoch``
    and ``step``: where a resume goes on (``step`` batches of ``next_epoch`` done, 0 at an epoch's
    end); ``loader_states``: each loader's generator state at the start of ``next_epoch``."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "next_epoch": next_epoch,
        "step": step,
        "global_step": global_step,
        "loaders": dict(loader_states or {}),
        "partial": partial,
        "derived": derived,
        "supernet_at_derive": supernet_at_derive,
        "meta": meta,
        "extra": extra,
        "model": model.state_dict(),
        "optimizer": opt_w.state_dict(),
        "arch_optimizer": opt_a.state_dict() if opt_a is not None else None,
        "arch_params": [p.detach().cpu().clone() for p in arch_params],
        "epoch": epoch,
        "stage": stage,
        "cfg": asdict(cfg),
        "history": list(history),
        "rng": _rng_state(),
    }
    save_torch(payload, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`train_two_stage` (``torch.load(weights_only=True)``: it
    runs no code) for ``resume``; an unreadable or older file is one clear error."""
    path = Path(path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: one line
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise UserInputError(f"cannot read checkpoint {path}: {type(exc).__name__}: {first}") from exc
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise UserInputError(f"{path} is not a checkpoint this archir can resume from (written by another "
                             "version?); start the run again without --resume, with --force")
    return ck


def _load_arch(arch_params: list[nn.Parameter], saved: list[Tensor]) -> None:
    if len(saved) != len(arch_params):
        raise UserInputError(f"the checkpoint holds {len(saved)} architecture parameters, this search "
                             f"{len(arch_params)}: it is not this run's")
    with torch.no_grad():
        for p, v in zip(arch_params, saved):
            p.copy_(v)


def _loader_states(loaders: dict) -> dict:
    """Each loader's CPU generator state (loaders without a ``generator`` attribute have none)."""
    out = {}
    for name, loader in loaders.items():
        g = getattr(loader, "generator", None)
        if isinstance(g, torch.Generator):
            out[name] = g.get_state()
    return out


def _set_loader_states(loaders: dict, states: dict) -> None:
    for name, st in states.items():
        g = getattr(loaders.get(name), "generator", None)
        if isinstance(g, torch.Generator):
            g.set_state(st)


_SIGNAL_NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


@contextmanager
def _stop_on_signals(state: _RunState, enabled: bool = True):
    """While training with checkpoints: SIGINT and SIGTERM set ``state.stop_signal`` instead of
    stopping the process, so that the run stops at the next step boundary with a checkpoint. A
    second signal stops at once (KeyboardInterrupt). The previous handlers come back afterwards.
    Only in the main thread (signal handlers cannot be set elsewhere)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        if state.stop_signal is not None:
            raise KeyboardInterrupt
        state.stop_signal = signum
        tqdm.write(f"archir: {_SIGNAL_NAMES.get(signum, signum)} received: stopping after the current step "
                   "with a checkpoint (send it again to stop at once)", file=sys.stderr)

    previous = {sig: signal.signal(sig, handler) for sig in _SIGNAL_NAMES}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _raise_interrupted(state: _RunState, epoch: int, epochs: int, where: str, path: Optional[Path]) -> None:
    signum = state.stop_signal or signal.SIGTERM  # another rank's signal (distributed): as SIGTERM
    name = _SIGNAL_NAMES.get(signum, str(signum))
    saved = f"; checkpoint written to {path}" if path is not None else "; no checkpoint (no output directory)"
    raise RunInterrupted(f"stopped by {name} in epoch {epoch + 1}/{epochs} ({state.stage} stage) {where}{saved}",
                         exit_code=128 + int(signum), checkpoint=str(path) if path is not None else None)
