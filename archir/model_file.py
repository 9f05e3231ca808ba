"""The MODEL.py convention: how ``archir inspect|transform MODEL.py`` finds a model.

MODEL.py defines ``build_model()`` or ``model()`` returning the ``nn.Module`` (or a module-level
``model`` instance), and optionally:

- ``example_input()`` returning a tensor or a tuple of the model's positional inputs (tensors, or
  lists, tuples and dicts of tensors);
- ``data()`` returning ``(train_dataset, val_dataset)``;
- ``collate(samples)`` returning one batch of a list of the data sets' samples (the
  ``collate_fn`` of a :class:`torch.utils.data.DataLoader`; default: stack their tensors), for
  samples that do not stack: a detector's images of different sizes and its target dicts;
- ``loss(output, target)`` returning a scalar tensor, the mean over the batch, of the model's
  output (whatever the model returns: a tensor, a tuple, a dict) and the batch's target
  (default: cross-entropy of the logits, a classifier);
- ``metric(output, target)`` returning a scalar tensor or a number, the mean over the batch,
  higher is better, reported under the function's name (default: top-1 accuracy with the
  default loss, and ``neg_loss``, the negative loss, when ``loss`` is defined);
- ``groups``: explicit cell-sharing groups, a dict ``{group name: [module path prefix, ...]}``
  (or a function returning one), e.g. ``{"stage1": ["layer1.0", "layer1.1", "layer1.2"]}``: the
  k-th edges under each prefix of a group share one key (``share="cell"``: one θ), overriding
  the automatic keys of those edges (``archir.frontends.build.assign_groups``).

``loss`` and ``metric`` become ``ModelSpec.task`` (``archir.task.make_task``); the batch
conventions (``(x, y)``, ``(x1, x2, y)``, ``{"x": x, "target": y}``) are those of
``archir.task``.
"""
from __future__ import annotations

import importlib.util
import sys
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import UserInputError
from .task import Task, classification_task, describe, make_task

DEFAULT_INPUT_SHAPE = (1, 3, 32, 32)


@dataclass
class ModelSpec:
    path: Path
    model: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    data: Callable | None
    task: Task = field(default_factory=classification_task)
    groups: dict | None = None  # explicit cell-sharing groups ({name: [module path prefix, ...]})
    collate: Callable | None = None  # how samples become a batch (DataLoader's collate_fn)


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,32,32' -> (1, 3, 32, 32); a clear error for anything else."""
    try:
        dims = tuple(int(p) for p in text.split(","))
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise UserInputError(f"bad input shape '{text}': give positive integers separated by commas, "
                             "e.g. --input-shape 1,3,32,32")
    return dims


def _user_error_line(exc: BaseException, path: Path) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path]
    where = f"{path}:{frames[-1].lineno}" if frames else str(path)
    return f"{where}: {type(exc).__name__}: {exc}"


def import_file(path: Path, prefix: str = "archir_user_model"):
    """Import a Python file by path under a unique module name; errors become one clear line."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserInputError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    sys.path.insert(0, str(path.parent))  # the model file may import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any error in user code becomes one clear line
        raise UserInputError(f"error while importing {_user_error_line(exc, path)}") from exc
    finally:
        sys.path.remove(str(path.parent))
    return module


def _call(fn: Callable, what: str, path: Path):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        raise UserInputError(f"{what} failed: {_user_error_line(exc, path)}") from exc


def _holds_tensors_only(value) -> bool:
    """Whether ``value`` is a tensor, or lists, tuples and dicts with tensors at every leaf."""
    if isinstance(value, torch.Tensor):
        return True
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else None
    return items is not None and len(items) > 0 and all(_holds_tensors_only(v) for v in items)


def load_model_file(path: str | Path, input_shape: str | tuple[int, ...] | None = None) -> ModelSpec:
    """Import MODEL.py and build its :class:`ModelSpec` (see the module docstring). Example inputs
    come from ``input_shape`` (random normal), else ``example_input()``, else a random
    :data:`DEFAULT_INPUT_SHAPE` tensor. Raises UserInputError for a missing file, an error while
    importing it or calling its functions, no model, or a return value of the wrong type."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise UserInputError(f"model file not found: {path}")
    module = import_file(path)
    factory = getattr(module, "build_model", None) or getattr(module, "model", None)
    if isinstance(factory, nn.Module):
        model = factory
    elif callable(factory):
        model = _call(factory, f"{getattr(factory, '__name__', 'model')}()", path)
    else:
        raise UserInputError(f"{path} defines no model: define build_model() or model() returning an "
                             "nn.Module, or a module-level nn.Module called model")
    if not isinstance(model, nn.Module):
        raise UserInputError(f"{path}: the model factory returned {type(model).__name__}, not an nn.Module")
    if input_shape is not None:
        shape = parse_shape(input_shape) if isinstance(input_shape, str) else tuple(input_shape)
        example = (torch.randn(shape),)
    elif callable(getattr(module, "example_input", None)):
        value = _call(module.example_input, "example_input()", path)
        if isinstance(value, torch.Tensor):
            example = (value,)
        elif isinstance(value, (tuple, list)) and value and _holds_tensors_only(value):
            example = tuple(value)
        else:
            hint = (" (a dict that is the model's one argument: return (the_dict,))"
                    if isinstance(value, dict) else "")
            raise UserInputError(f"{path}: example_input() must return a tensor or a tuple of the model's "
                                 "positional arguments, each a tensor or a list, tuple or dict of tensors; "
                                 f"it returned {describe(value)}{hint}")
    else:
        example = (torch.randn(DEFAULT_INPUT_SHAPE),)
    data = getattr(module, "data", None)
    collate = getattr(module, "collate", None)
    if collate is not None and not callable(collate):
        raise UserInputError(f"{path}: collate must be a function collate(samples) returning a batch, got "
                             f"{type(collate).__name__}")
    return ModelSpec(path, model, example, data if callable(data) else None, _task(module, path),
                     _groups(module, path), collate and _user_collate(collate, path))


def _user_collate(fn: Callable, path: Path) -> Callable:
    """MODEL.py's ``collate``, whose errors (raised while the trainer iterates a loader) become one
    clear line naming the file and line."""
    def collate(samples):
        try:
            return fn(samples)
        except Exception as exc:  # noqa: BLE001
            raise UserInputError(f"collate() failed on a batch of {len(samples)} samples: "
                                 f"{_user_error_line(exc, path)}") from exc
    return collate


def _groups(module, path: Path) -> dict | None:
    """MODEL.py's optional ``groups``: a dict, or a function returning one (checked further, against
    the traced model, by ``archir.trace(..., groups=...)``)."""
    value = getattr(module, "groups", None)
    if callable(value):
        value = _call(value, "groups()", path)
    if value is not None and not isinstance(value, dict):
        raise UserInputError(f"{path}: groups must be a dict {{group name: [module path prefix, ...]}}, "
                             f"not {type(value).__name__}")
    return value or None


def _task(module, path: Path) -> Task:
    """The task of MODEL.py's optional ``loss`` and ``metric`` functions."""
    fns = {}
    for name in ("loss", "metric"):
        fn = getattr(module, name, None)
        if fn is not None and not callable(fn):
            raise UserInputError(f"{path}: {name} must be a function {name}(output, target), got "
                                 f"{type(fn).__name__}")
        fns[name] = fn
    return make_task(fns["loss"], fns["metric"])
