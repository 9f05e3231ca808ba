"""Options as dataclasses: one declaration gives the Python keyword, its default, its check and its CLI flag.

A field declared with :func:`option` carries its help text (and, for strings, the allowed values)
in ``field.metadata``. :func:`click_params` turns the fields of one or more dataclasses into
``click`` options (``share`` → ``--share``, a ``bool`` defaulting to True → ``--no-<name>``), so a
method that declares an options dataclass adds flags to ``archir transform`` without any CLI code.
:func:`build_options` builds the dataclass from keyword arguments and turns every unknown name or
bad value into one :class:`~archir.errors.UserInputError`.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Iterable, Literal, get_args, get_origin

from .errors import UserInputError

_MISSING = dataclasses.MISSING


def option(default: Any, help: str, *, choices: Iterable[str] | None = None, cli: bool = True,
           minimum: float | None = None, maximum: float | None = None, flag: str | None = None) -> Any:
    """A dataclass field with CLI metadata: ``help`` text, optional ``choices`` (strings),
    ``minimum``/``maximum`` bounds (checked by :func:`build_options`), ``cli=False`` to keep it
    out of the command line, ``flag`` to name the flag differently."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "cli": cli,
            "minimum": minimum, "maximum": maximum, "flag": flag}
    return dataclasses.field(default=default, metadata=meta)


def fields_of(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of dataclass ``cls`` by name, in declaration order."""
    return {f.name: f for f in dataclasses.fields(cls)}


def _base_type(cls: type, name: str) -> type:
    """The plain type of a field: ``int | None`` → int, ``Literal['a', 'b']`` → str."""
    hint = typing.get_type_hints(cls)[name]
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else str
    if get_origin(hint) is Literal:
        return type(get_args(hint)[0])
    return hint if isinstance(hint, type) else str


def flag_name(f: dataclasses.Field) -> str:
    """The field's CLI flag: ``--`` + its ``flag`` metadata, or its name with ``_`` → ``-``."""
    return "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))


def check_value(cls: type, name: str, value: Any) -> None:
    """Raise a UserInputError when ``value`` breaks the field's declared choices or bounds."""
    f = fields_of(cls)[name]
    label = flag_name(f) if f.metadata.get("cli", True) else name
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UserInputError(f"{label} must be one of {', '.join(map(str, choices))}, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserInputError(f"{label} must be a finite number, not {value}")
    lo, hi = f.metadata.get("minimum"), f.metadata.get("maximum")
    if value is not None and lo is not None and value < lo:
        raise UserInputError(f"{label} must be >= {lo}, not {value}")
    if value is not None and hi is not None and value > hi:
        raise UserInputError(f"{label} must be <= {hi}, not {value}")


def build_options(cls: type, values: dict[str, Any], owner: str) -> Any:
    """``cls(**values)`` after checking every name and value; ``owner`` names who declares them."""
    known = fields_of(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserInputError(f"unknown option(s) for {owner}: {', '.join(unknown)}; it takes: "
                             f"{', '.join(known) or 'none'}")
    for name, value in values.items():
        check_value(cls, name, value)
    return cls(**values)


def click_params(classes: Iterable[type], owners: dict[type, str] | None = None) -> list:
    """``click.Option``s for the CLI fields of ``classes``. A field declared by several classes
    (two methods both having ``share``) becomes one flag whose help names each owner, and shows a
    default only where they agree. Callers read back only what the user typed
    (:func:`given_on_command_line`), so each dataclass keeps its own defaults."""
    import click

    seen: dict[str, list[tuple[type, dataclasses.Field]]] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True):
                seen.setdefault(f.name, []).append((cls, f))
    params = []
    for name, decls in seen.items():
        cls, f = decls[0]
        typ = _base_type(cls, name)
        defaults = {repr(fd.default) for _, fd in decls}
        default = f.default if len(defaults) == 1 and f.default is not _MISSING else None
        help_text = " ".join((f"[{owners[c]}] " if owners and c in owners else "") + fd.metadata.get("help", "")
                             for c, fd in decls)
        choices = f.metadata.get("choices")
        flag = flag_name(f)
        if typ is bool:  # False by default: a plain flag; True: --x/--no-x
            decl = f"{flag}/--no-{flag[2:]}" if default is not False else flag
            params.append(click.Option([decl, name], is_flag=True, default=bool(default),
                                       show_default=default is True, help=help_text))
            continue
        ctype = click.Choice(list(choices)) if choices else {int: int, float: float}.get(typ, str)
        params.append(click.Option([flag, name], type=ctype, default=default,
                                   show_default=default is not None, help=help_text))
    return params


def given_on_command_line(ctx, names: Iterable[str]) -> dict[str, Any]:
    """The options among ``names`` that the user typed (not click's defaults)."""
    import click

    out = {}
    for name in names:
        source = ctx.get_parameter_source(name)
        if source in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT):
            out[name] = ctx.params[name]
    return out
