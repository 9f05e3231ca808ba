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
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from .fileio import save_torch
from .modes import eval_mode
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
]

ARCH_UPDATES = ("alternate", "split", "joint")
SCHEDULES = ("cosine", "constant")
ARCH_OPTIMIZERS = ("adam", "sgd", "method")  # method: the one the search method names (else Adam)
CHECKPOINT_NAME = "checkpoint.pt"


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
            (``"stage"`` says which), plus θ, the optimizer states, epoch, stage, config
            and history. Resuming from it is not implemented yet (a resume would re-derive the
            network from the saved θ before loading the network-stage state).
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
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

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
    state = _RunState(cfg=cfg, device=device, total_steps=total_steps, task=train_task)
    snapshot = (lambda: _snapshot(log_arch())) if log_arch is not None else (lambda: None)
    initial_arch = snapshot()

    model = supernet
    opt_w = _sgd(_weights(supernet, arch_ids), cfg)
    opt_a = _arch_optimizer(arch_params, cfg, arch_optimizer) if arch_params and arch_epochs > 0 else None
    carried = 0
    derived = False

    def do_derive() -> None:
        nonlocal model, opt_w, carried, derived
        derived = True
        if opt_a is not None:
            opt_a.zero_grad(set_to_none=True)  # θ is frozen from here on
        if derive is None:
            return
        t0 = time.perf_counter()
        network = derive(supernet)
        network.to(device)
        new_opt = _sgd(_weights(network, arch_ids), cfg)
        carried = carry_optimizer_state(opt_w, new_opt)
        model, opt_w = network, new_opt
        clock.derive += time.perf_counter() - t0

    with _deterministic(cfg.deterministic):
        for epoch in range(epochs):
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

            t0 = time.perf_counter()
            lr0 = state.lr_at(state.global_step)
            label = f"{stage} warm-up" if warmup else stage
            train_loss, train_metric, steps = _run_epoch(model, loader, step, opt_w, state,
                                                         desc=f"{label} {epoch + 1}/{epochs}")
            train_seconds = time.perf_counter() - t0
            clock.add(stage, train_seconds, steps)

            t1 = time.perf_counter()
            val_loss, val_metric = (evaluate(model, val_loader, device, eval_task) if val_loader is not None
                                    else (None, None))
            clock.eval += time.perf_counter() - t1

            record = EpochRecord(epoch=epoch, stage=stage, train_loss=train_loss, train_metric=train_metric,
                                 val_loss=val_loss, val_metric=val_metric, lr=lr0, steps=steps,
                                 seconds=time.perf_counter() - t0, train_seconds=train_seconds,
                                 arch=snapshot(), metric_name=train_task.metric_name, warmup=warmup,
                                 arch_stepped=arch_stage and not warmup and opt_a is not None and steps > 0)
            if arch_stage and log_changes is not None:
                changed, searchable = log_changes()
                record.changed_edges, record.searchable_edges = sorted(changed), int(searchable)
            state.history.append(asdict(record))
            if cfg.progress:
                tqdm.write(record.summary(epochs))
            if on_epoch is not None:
                on_epoch(record)
            if ckpt_dir is not None:
                _save_checkpoint(ckpt_dir / CHECKPOINT_NAME, model=model, opt_w=opt_w,
                                 opt_a=opt_a if arch_stage else None, arch_params=arch_params,
                                 epoch=epoch, stage=stage, cfg=cfg, history=state.history)

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

    def lr_at(self, step: int) -> float:
        if self.cfg.schedule == "constant":
            return self.cfg.lr
        return cosine_lr(self.cfg.lr, step, self.total_steps)


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


def _clip(params: list[nn.Parameter], cfg: TrainConfig) -> None:
    if cfg.grad_clip is not None:
        nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)


# A step gets one batch already split and on the device: (args, kwargs, target); it returns the
# loss and the model output of its ω pass.
StepFn = Callable[[tuple, dict, Any], tuple[Tensor, Any]]


def _net_step(model: nn.Module, w_params: list[nn.Parameter], opt_w: torch.optim.Optimizer,
              state: _RunState) -> StepFn:
    """One SGD step of ω; returns (loss, output) of the batch."""
    loss_fn = state.task.loss

    def step(args: tuple, kwargs: dict, target: Any) -> tuple[Tensor, Any]:
        out = model(*args, **kwargs)
        loss = loss_fn(out, target)
        opt_w.zero_grad(set_to_none=True)
        loss.backward(inputs=w_params)
        _clip(w_params, state.cfg)
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
        arch_update()

    if mode == "alternate":
        def step(args: tuple, kwargs: dict, target: Any) -> tuple[Tensor, Any]:
            result = net_step(args, kwargs, target)
            theta_pass(args, kwargs, target)
            return result
        return step

    if mode == "split":
        held_out = _cycle(arch_loader)

        def step(args: tuple, kwargs: dict, target: Any) -> tuple[Tensor, Any]:
            result = net_step(args, kwargs, target)
            theta_pass(*move_to(task.split_batch(next(held_out)), state.device))
            return result
        return step

    both = w_params + arch_params

    def step(args: tuple, kwargs: dict, target: Any) -> tuple[Tensor, Any]:  # joint
        out = model(*args, **kwargs)
        loss = task.loss(out, target)
        total = loss + extra_loss(model) if extra_loss is not None else loss
        opt_w.zero_grad(set_to_none=True)
        opt_a.zero_grad(set_to_none=True)
        total.backward(inputs=both)
        _clip(w_params, state.cfg)
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
               state: _RunState, desc: str) -> tuple[float, float, int]:
    """Iterate ``loader`` once calling ``step`` per batch; returns (mean loss, mean metric,
    steps). Loss and metric are accumulated on the device and read back only every
    ``log_every`` steps for the progress bar (when shown) and once at the end."""
    cfg, device, task = state.cfg, state.device, state.task
    name = task.metric_name
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    metric_sum = torch.zeros((), dtype=torch.float64, device=device)
    n = steps = 0
    bar = tqdm(loader, total=len(loader), desc=desc, disable=None if cfg.progress else True,
               leave=False, dynamic_ncols=True)
    try:
        for batch in bar:
            if not state.checked:
                _preflight(model, loader, batch, state)
            args, kwargs, target = move_to(task.split_batch(batch), device)
            n_b = batch_size(args, kwargs, target)
            lr = state.lr_at(state.global_step)
            for group in opt_w.param_groups:
                group["lr"] = lr
            loss, out = step(args, kwargs, target)
            loss_b = (loss.detach() if loss.dim() == 0 else loss.detach().reshape(())).double() * n_b
            loss_sum += loss_b
            with torch.no_grad():
                metric_sum += task.total_metric(out, target, n_b, device, loss_total=loss_b)
            n += n_b
            steps += 1
            state.global_step += 1
            if not bar.disable and steps % cfg.log_every == 0:
                bar.set_postfix({"loss": f"{loss_sum.item() / n:.4f}",
                                 name: format_metric(name, metric_sum.item() / n), "lr": f"{lr:.4g}"},
                                refresh=False)
    finally:
        bar.close()
    if n == 0:
        return float("nan"), float("nan"), 0
    return loss_sum.item() / n, metric_sum.item() / n, steps


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
                     epoch: int, stage: str, cfg: TrainConfig, history: list) -> None:
    """Write the checkpoint atomically (``archir.fileio.save_torch``). It holds tensors and
    plain python values only, so ``torch.load(path, weights_only=True)`` reads it."""
    payload = {
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
