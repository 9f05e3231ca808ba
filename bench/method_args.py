"""``--method`` and ``--method-option NAME=VALUE`` for the benchmark scripts.

A benchmark names a search method from archir's registry (``archir.methods``) and passes its
options through ``archir.search(model, x, method=..., **options)`` / ``archir.transform``, never by
building a method's passes itself. The values are checked against the method's ``Options``
dataclass (names, choices, bounds) when the command line is read, before any long run starts.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from archir import methods
from archir.errors import UserInputError


def add_method_arguments(parser: argparse.ArgumentParser, default: str = "dnat") -> None:
    names = ", ".join(sorted(methods.available()))
    parser.add_argument("--method", default=default, help=f"search method (archir.methods: {names}; default {default})")
    parser.add_argument("--method-option", dest="method_option", action="append", default=[],
                        metavar="NAME=VALUE", help="an option of the method, e.g. share=full (repeatable)")


def has_option(method: str, name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(methods.get(method).Options)}


def _parse(field: dataclasses.Field, text: str) -> Any:
    default = field.default
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UserInputError(f"option {field.name} wants true or false, not {text!r}")
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            raise UserInputError(f"option {field.name} wants a {type(default).__name__}, not {text!r}") from None
    if default is None:
        if text.lower() == "none":
            return None
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
    return text


def method_options(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   defaults: dict[str, Any] | None = None,
                   overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options for ``args.method``: the benchmark's ``defaults`` (only those the method
    declares), then every ``--method-option``, then ``overrides`` (a value the benchmark sweeps);
    checked with ``archir.methods.create`` (a bad name or value is a usage error)."""
    try:
        fields = {f.name: f for f in dataclasses.fields(methods.get(args.method).Options)}
        out = {k: v for k, v in (defaults or {}).items() if k in fields}
        for pair in args.method_option:
            name, sep, text = pair.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or not name:
                raise UserInputError(f"--method-option wants NAME=VALUE, not {pair!r}")
            out[name] = _parse(fields[name], text) if name in fields else text
        out.update(overrides or {})
        methods.create(args.method, **out)  # unknown names, choices and bounds fail here
    except UserInputError as exc:
        parser.error(str(exc))
    return out
