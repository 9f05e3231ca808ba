"""What the trainer optimises and reports: a :class:`Task` is a loss, a metric and a batch layout.

The trainer (``archir.training``) knows nothing about classification; it asks a ``Task`` how to
split a batch into model inputs and a target, what loss to minimise and what metric to report.
``classification_task()`` (cross-entropy, top-1 accuracy) is the default everywhere.

Batch conventions (``split_batch``), for every loader the trainer iterates:

- **a tuple or list of length ≥ 2**: the last element is the target, the others are the model's
  positional inputs: ``(x, y)`` calls ``model(x)``, ``(x1, x2, y)`` calls ``model(x1, x2)``;
- **a dict**: the target is under the key ``"target"`` (else ``"targets"``, ``"y"``, ``"label"``,
  ``"labels"``, the first one present in that order); every other key is passed to the model as
  a keyword argument: ``{"x": x, "mask": m, "target": y}`` calls ``model(x=x, mask=m)``. A dict
  without any of these keys is an error;
- anything else (a bare tensor, a 1-tuple, ...) is a :class:`~archir.errors.UserInputError`.

The target itself may be any structure (a tensor, a tuple, a dict of tensors); tensors anywhere
in the inputs and the target are moved to the device by :func:`move_to`.

The loss and the metric are functions ``f(output, target)`` of the model's output (whatever it
returns: a tensor, a tuple, a dict) and the target:

- ``loss`` returns a scalar tensor, the mean over the batch (it is back-propagated);
- ``metric`` returns a scalar (a one-element tensor or a number), the mean over the batch;
  higher is better. ``metric_name`` names it in records and logs.

The trainer weights both by the batch size (the first dimension of the first tensor input) when
it averages over an epoch or a data set, and accumulates them on the device (no host sync per
step). :func:`make_task` builds a task from user functions (MODEL.py's ``loss``/``metric``);
:func:`check_task` runs one batch through model, loss and metric before training so that a
mismatch is one clear error line instead of a traceback deep inside the training loop.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .errors import UserInputError
from .modes import eval_mode

__all__ = [
    "Task",
    "TARGET_KEYS",
    "classification_task",
    "make_task",
    "split_batch",
    "move_to",
    "batch_size",
    "check_task",
    "check_labels",
    "dataset_targets",
    "describe",
]

TARGET_KEYS = ("target", "targets", "y", "label", "labels")
IGNORE_INDEX = -100  # cross-entropy's default ignore_index: such labels are not range-checked

LossFn = Callable[[Any, Any], Tensor]
MetricFn = Callable[[Any, Any], "Tensor | float"]


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def split_batch(batch: Any) -> tuple[tuple, dict, Any]:
    """``(args, kwargs, target)`` of a batch, following the conventions of the module docstring."""
    if isinstance(batch, (tuple, list)):
        if len(batch) < 2:
            raise UserInputError(
                f"a batch {type(batch).__name__} needs at least 2 elements (inputs..., target), got "
                f"{len(batch)}: yield (x, y), (x1, x2, y) or a dict with a 'target' key")
        return tuple(batch[:-1]), {}, batch[-1]
    if isinstance(batch, dict):
        key = next((k for k in TARGET_KEYS if k in batch), None)
        if key is None:
            raise UserInputError(
                f"a dict batch needs its target under one of the keys {', '.join(map(repr, TARGET_KEYS))}; "
                f"this batch has the keys {', '.join(map(repr, batch))}")
        bad = [k for k in batch if not isinstance(k, str)]
        if bad:
            raise UserInputError(f"the keys of a dict batch are passed to the model as keyword arguments "
                                 f"and must be strings, got {bad[0]!r}")
        return (), {k: v for k, v in batch.items() if k != key}, batch[key]
    raise UserInputError(
        f"a batch must be a tuple/list (inputs..., target) or a dict with a 'target' key, got "
        f"{describe(batch)}")


def move_to(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (nested tuples, lists, dicts, namedtuples) on ``device``
    (copied ``non_blocking``, made contiguous only when it is not already); other objects are
    returned unchanged, and so are tensors already on ``device`` and contiguous."""
    if isinstance(obj, Tensor):
        if obj.device != device:
            obj = obj.to(device, non_blocking=True)
        return obj if obj.is_contiguous() else obj.contiguous()
    if isinstance(obj, tuple):
        if hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*(move_to(v, device) for v in obj))
        return tuple(move_to(v, device) for v in obj)
    if isinstance(obj, list):
        return [move_to(v, device) for v in obj]
    if isinstance(obj, dict):
        moved = {k: move_to(v, device) for k, v in obj.items()}
        return moved if type(obj) is dict else _rebuild_mapping(obj, moved)
    return obj


def _rebuild_mapping(original: dict, items: dict) -> dict:
    try:
        return type(original)(items)
    except Exception:  # noqa: BLE001 - a mapping type without a plain constructor
        return items


def _first_tensor(obj: Any) -> Optional[Tensor]:
    if isinstance(obj, Tensor):
        return obj
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def batch_size(args: tuple, kwargs: dict, target: Any = None) -> int:
    """The number of examples of a batch: the first dimension of its first tensor input (of the
    target when no input is a tensor; 1 when nothing has a batch dimension)."""
    if args and isinstance(args[0], Tensor) and args[0].dim() > 0:  # the common case, fast
        return args[0].shape[0]
    for part in (args, kwargs, target):
        t = _first_tensor(part)
        if t is not None and t.dim() > 0:
            return t.shape[0]
    return 1


_DTYPES = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "b8", torch.complex64: "c64", torch.complex128: "c128",
}


def describe(obj: Any) -> str:
    """A short description of a value for error messages: ``f32[128,1,28,28]`` for a tensor,
    ``(f32[2,3], i64[2])`` for a tuple, ``{x: f32[2,3]}`` for a dict, the type name otherwise."""
    if isinstance(obj, Tensor):
        dtype = _DTYPES.get(obj.dtype, str(obj.dtype).replace("torch.", ""))
        return f"{dtype}[{','.join(str(d) for d in obj.shape)}]"
    if isinstance(obj, (tuple, list)):
        inner = ", ".join(describe(v) for v in obj)
        return f"({inner})" if isinstance(obj, tuple) else f"[{inner}]"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (int, float, bool)) or obj is None:
        return repr(obj)
    return type(obj).__name__


def argument_names(module: nn.Module, count: int) -> list[str]:
    """The names of ``module.forward``'s first ``count`` positional parameters (``input_<i>``
    where it has fewer, or takes ``*args``): what traced and exported inputs are named after."""
    try:
        params = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"input_{i}" for i in range(count)]


def _describe_inputs(args: tuple, kwargs: dict) -> str:
    parts = [describe(a) for a in args] + [f"{k}={describe(v)}" for k, v in kwargs.items()]
    return ", ".join(parts) if parts else "no inputs"


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


@dataclass
class Task:
    """A loss, a metric and a batch layout (see the module docstring).

    Attributes:
        loss: ``loss(output, target)`` -> scalar tensor, the mean over the batch.
        metric: ``metric(output, target)`` -> scalar tensor or number, the mean over the batch;
            higher is better.
        metric_name: the metric's name in records and logs ("accuracy" is shown in percent).
        classification: the loss is cross-entropy over class indices (``check_task`` then checks
            the labels against the model's number of outputs).
        loss_sum, metric_sum: optional exact batch totals (``reduction="sum"``); when None the
            total is the mean times the batch size. The classification task uses them so that
            its numbers are exactly cross-entropy sums and correct-prediction counts.
    """

    loss: LossFn
    metric: MetricFn
    metric_name: str = "metric"
    classification: bool = False
    loss_sum: Optional[LossFn] = None
    metric_sum: Optional[MetricFn] = None

    def split_batch(self, batch: Any) -> tuple[tuple, dict, Any]:
        """``(args, kwargs, target)``: the model is called as ``model(*args, **kwargs)``."""
        return split_batch(batch)

    # The trainer's accumulators: detached scalar tensors on ``device`` (no host sync), to be
    # added to float64 accumulators. Means are cast to float64 before they are multiplied by
    # the batch size; exact sums keep their dtype (an integer count is promoted exactly).

    def total_loss(self, output: Any, target: Any, n: int, device: torch.device) -> Tensor:
        """The batch's loss summed over its ``n`` examples."""
        if self.loss_sum is not None:
            return _scalar(self.loss_sum(output, target), "loss", self.loss, device, cast=False)
        return _scalar(self.loss(output, target), "loss", self.loss, device) * n

    def total_metric(self, output: Any, target: Any, n: int, device: torch.device,
                     loss_total: Optional[Tensor] = None) -> Tensor:
        """The batch's metric summed over its ``n`` examples. ``loss_total`` (this batch's
        ``total_loss``) saves a second loss call for "neg_loss"."""
        if isinstance(self.metric, NegLoss) and self.metric.loss is self.loss:
            if loss_total is None:
                loss_total = self.total_loss(output, target, n, device)
            return -loss_total
        if self.metric_sum is not None:
            return _scalar(self.metric_sum(output, target), "metric", self.metric, device, cast=False)
        return _scalar(self.metric(output, target), "metric", self.metric, device) * n


def _scalar(value: Any, role: str, fn: Callable, device: torch.device, cast: bool = True) -> Tensor:
    """A loss or metric value as a detached 0-d tensor on ``device`` (float64 when ``cast``),
    without a host sync. Called every step: each check is skipped when it is not needed."""
    if isinstance(value, Tensor):
        if value.dim():
            if value.numel() != 1:
                raise UserInputError(f"the {role} function {fn_name(fn)} must return a scalar (the mean "
                                     f"over the batch), got {describe(value)}")
            value = value.reshape(())
        if value.requires_grad:
            value = value.detach()
        if value.device != device:
            value = value.to(device, non_blocking=True)
        return value.to(torch.float64) if cast and value.dtype != torch.float64 else value
    if isinstance(value, (int, float)) or (hasattr(value, "__float__") and not isinstance(value, (str, bytes))):
        return torch.full((), float(value), dtype=torch.float64, device=device)
    raise UserInputError(f"the {role} function {fn_name(fn)} must return a scalar tensor or a number, "
                         f"got {describe(value)}")


def fn_name(fn: Callable) -> str:
    """A user function's name for messages: its ``__name__``, a partial's function's name, or
    the type name of a callable object."""
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str):
        name = getattr(getattr(fn, "func", None), "__name__", None) or type(fn).__name__
    return name


def _logits(output: Any) -> Tensor:
    """The logits of a model output for the default classification loss: the output itself, or
    the first element of a tuple/list (e.g. main + auxiliary heads)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):
        raise UserInputError(
            f"the model returns a dict (keys {', '.join(map(repr, output))}) but the default loss, "
            "cross-entropy, needs a logits tensor: define loss(output, target) (and metric(output, "
            "target)) for this model, e.g. in MODEL.py")
    raise UserInputError(
        f"the model returns {describe(output)} but the default loss, cross-entropy, needs a logits "
        "tensor: define loss(output, target) for this model, e.g. in MODEL.py")


def _class_dim(logits: Tensor) -> int:
    return 1 if logits.dim() > 1 else 0


def _predicted_and_target(output: Any, target: Tensor) -> tuple[Tensor, Tensor]:
    logits = _logits(output)
    dim = _class_dim(logits)
    if target.is_floating_point() and target.shape == logits.shape:  # class probabilities
        target = target.argmax(dim)
    return logits.argmax(dim), target


def accuracy(output: Any, target: Tensor) -> Tensor:
    """Top-1 accuracy: the fraction of examples whose largest logit is the target class."""
    pred, target = _predicted_and_target(output, target)
    return (pred == target).float().mean()


def correct_count(output: Any, target: Tensor) -> Tensor:
    """The number of correct top-1 predictions of the batch (``accuracy``'s exact total)."""
    pred, target = _predicted_and_target(output, target)
    return (pred == target).sum()


def _cross_entropy(label_smoothing: float, reduction: str) -> LossFn:
    def cross_entropy(output: Any, target: Tensor) -> Tensor:
        return F.cross_entropy(_logits(output), target, reduction=reduction, label_smoothing=label_smoothing)
    return cross_entropy


class NegLoss:
    """The metric of a task with a user loss and no metric: ``-loss(output, target)``."""

    __slots__ = ("loss",)

    def __init__(self, loss: LossFn):
        self.loss = loss

    def __call__(self, output: Any, target: Any) -> Tensor:
        return -self.loss(output, target)

    @property
    def __name__(self) -> str:  # noqa: A003 - shown in messages
        return "neg_loss"


def classification_task(label_smoothing: float = 0.0) -> Task:
    """The default task: cross-entropy of the logits (with ``label_smoothing``; a model returning
    a tuple/list: its first element) and top-1 accuracy, named "accuracy"."""
    return Task(loss=_cross_entropy(label_smoothing, "mean"), metric=accuracy, metric_name="accuracy",
                classification=True, loss_sum=_cross_entropy(label_smoothing, "sum"), metric_sum=correct_count)


def make_task(loss: Optional[LossFn] = None, metric: Optional[MetricFn] = None,
              label_smoothing: float = 0.0) -> Task:
    """A task from user functions (e.g. MODEL.py's ``loss`` and ``metric``).

    - no loss: cross-entropy with ``label_smoothing`` (the classification loss);
    - no metric: top-1 accuracy ("accuracy") with the default loss; with a user loss, the
      negative loss ("neg_loss": higher is better, accuracy means nothing for a regression);
    - a user metric is named after its ``__name__`` (a lambda: "metric").
    """
    for fn, role in ((loss, "loss"), (metric, "metric")):
        if fn is not None and not callable(fn):
            raise UserInputError(f"{role} must be a function {role}(output, target), got {describe(fn)}")
    if loss is None and metric is None:
        return classification_task(label_smoothing)
    if loss is None:
        return Task(loss=_cross_entropy(label_smoothing, "mean"), metric=metric, metric_name=_metric_name(metric),
                    classification=True, loss_sum=_cross_entropy(label_smoothing, "sum"))
    if metric is None:
        return Task(loss=loss, metric=NegLoss(loss), metric_name="neg_loss")
    return Task(loss=loss, metric=metric, metric_name=_metric_name(metric))


def _metric_name(metric: Callable) -> str:
    name = fn_name(metric)
    return "metric" if name.startswith("<") else name


# --------------------------------------------------------------------------------------------
# Preflight checks
# --------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _call_user(fn: Callable, role: str, output: Any, target: Any) -> Any:
    try:
        return fn(output, target)
    except UserInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code: one clear line
        raise UserInputError(f"the {role} function {fn_name(fn)}(output, target) failed on the first batch "
                             f"(output {describe(output)}, target {describe(target)}): {_first_line(exc)}") from exc


def check_task(model: nn.Module, batch: Any, task: Task, device: str | torch.device,
               num_outputs_hint: Optional[int] = None) -> Optional[int]:
    """Run ``model`` on one real ``batch`` and apply ``task``'s loss and metric, before training.

    The model runs in eval mode under ``torch.no_grad`` (each module's train/eval flag is
    restored afterwards) on ``device`` (the batch is moved there; the model is expected there
    already). Every mismatch is a :class:`UserInputError` with one clear line: the batch does
    not follow the conventions; the model cannot take the inputs; with the classification loss,
    a model with fewer than 2 outputs, labels outside ``[0, C)`` (C: the model's number of
    outputs), or fewer outputs than ``num_outputs_hint`` (the number of classes the data set
    declares, when known); the loss or the metric raises; the loss is not a scalar tensor or is
    not finite.

    Returns C for a classification task, else None.
    """
    device = torch.device(device)
    args, kwargs, target = move_to(task.split_batch(batch), device)
    with eval_mode(model), torch.no_grad():
        try:
            output = model(*args, **kwargs)
        except UserInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - user code: one clear line
            raise UserInputError(f"the model cannot take the batch's inputs ({_describe_inputs(args, kwargs)}): "
                                 f"{_first_line(exc)}") from exc
        num_classes = _check_classification(output, target, num_outputs_hint) if task.classification else None
        loss = _call_user(task.loss, "loss", output, target)
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
            raise UserInputError(f"the loss function {fn_name(task.loss)} must return a scalar floating-point "
                                 f"tensor (the mean over the batch), got {describe(loss)}")
        value = float(loss)
        if not math.isfinite(value):
            raise UserInputError(f"the loss is {value} at initialisation (before any training step) on the "
                                 f"first batch: check the loss function {fn_name(task.loss)}, the inputs and "
                                 "the model's initial weights")
        metric = _call_user(task.metric, "metric", output, target)
        if isinstance(metric, Tensor):
            if metric.numel() != 1:
                raise UserInputError(f"the metric function {fn_name(task.metric)} must return a scalar (the "
                                     f"mean over the batch), got {describe(metric)}")
        elif isinstance(metric, (str, bytes)) or not hasattr(metric, "__float__"):
            raise UserInputError(f"the metric function {fn_name(task.metric)} must return a scalar tensor or "
                                 f"a number, got {describe(metric)}")
    return num_classes


def _check_classification(output: Any, target: Any, num_outputs_hint: Optional[int]) -> Optional[int]:
    logits = _logits(output)
    if logits.dim() == 0:
        return None
    num_classes = logits.shape[_class_dim(logits)]
    if num_classes < 2:
        raise UserInputError(
            f"the model has {num_classes} output but the classification loss (cross-entropy) needs at least "
            "2, one per class; for a binary or regression target define loss(output, target) (and metric)")
    if num_outputs_hint is not None and num_outputs_hint > num_classes:
        raise UserInputError(f"the data set has {num_outputs_hint} classes but the model has only {num_classes} "
                             f"outputs: give the model {num_outputs_hint} outputs")
    if isinstance(target, Tensor) and not target.is_floating_point() and not target.is_complex():
        labels = target[target != IGNORE_INDEX]
        if labels.numel():
            _check_label_range(int(labels.max()), int(labels.min()), num_classes, "the first batch")
    return num_classes


def _check_label_range(largest: int, smallest: int, num_classes: int, where: str) -> None:
    if largest >= num_classes:
        raise UserInputError(
            f"label {largest} in {where} is out of range for a model with {num_classes} outputs (classes "
            f"0..{num_classes - 1}): give the model at least {largest + 1} outputs or fix the labels")
    if smallest < 0:
        raise UserInputError(f"label {smallest} in {where} is negative: class labels must lie in "
                             f"[0, {num_classes}) (or be {IGNORE_INDEX}, ignored)")


def dataset_targets(dataset: Any) -> Optional[Tensor]:
    """The integer class labels of a data set when it exposes them (``targets``, ``labels``, a
    ``TensorDataset``'s ``tensors[1]``, a ``Subset`` of such a data set), else None."""
    if dataset is None:
        return None
    indices = getattr(dataset, "indices", None)
    parent = getattr(dataset, "dataset", None)
    if indices is not None and parent is not None:  # torch.utils.data.Subset
        labels = dataset_targets(parent)
        if labels is None:
            return None
        try:
            return labels[torch.as_tensor(indices, dtype=torch.int64)]
        except (TypeError, ValueError, RuntimeError, IndexError):
            return None
    candidates = [getattr(dataset, "targets", None), getattr(dataset, "labels", None)]
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, (tuple, list)) and len(tensors) >= 2:
        candidates.append(tensors[1])
    try:
        n = len(dataset)
    except TypeError:
        return None
    for values in candidates:
        if values is None or callable(values):
            continue
        try:
            labels = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError):
            continue
        if labels.dim() == 1 and labels.numel() == n and not labels.is_floating_point() \
                and labels.dtype != torch.bool and not labels.is_complex():
            return labels
    return None


def check_labels(dataset: Any, num_classes: int) -> None:
    """For the classification task: when ``dataset`` exposes its labels (see
    :func:`dataset_targets`), its largest label must be < ``num_classes`` (the model's number of
    outputs) and it must hold at least two classes. A data set that does not expose its labels
    is not checked (``check_task`` still checks the first batch)."""
    labels = dataset_targets(dataset)
    if labels is None or labels.numel() == 0:
        return
    labels = labels[labels != IGNORE_INDEX]
    if labels.numel() == 0:
        return
    largest, smallest = int(labels.max()), int(labels.min())
    _check_label_range(largest, smallest, num_classes, f"the data set ({labels.numel()} labels)")
    if largest == smallest:
        raise UserInputError(f"every label of the data set is {largest}: a classifier needs at least two "
                             "classes (check the data, or define loss(output, target) for another task)")
