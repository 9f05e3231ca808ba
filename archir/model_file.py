"""The MODEL.py convention: how ``archir inspect|transform MODEL.py`` finds a model.

MODEL.py defines ``build_model()`` or ``model()`` returning the ``nn.Module`` (or a module-level
``model`` instance), optionally ``example_input()`` returning a tensor or a tuple of tensors, and
optionally ``data()`` returning ``(train_dataset, val_dataset)``.
"""
from __future__ import annotations

import importlib.util
import sys
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import UserInputError

DEFAULT_INPUT_SHAPE = (1, 3, 32, 32)


@dataclass
class ModelSpec:
    path: Path
    model: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    data: Callable | None


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


def load_model_file(path: str | Path, input_shape: str | tuple[int, ...] | None = None) -> ModelSpec:
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
        elif isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
            example = tuple(value)
        else:
            raise UserInputError(f"{path}: example_input() must return a tensor or a tuple of tensors")
    else:
        example = (torch.randn(DEFAULT_INPUT_SHAPE),)
    data = getattr(module, "data", None)
    return ModelSpec(path, model, example, data if callable(data) else None)
