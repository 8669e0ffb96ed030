"""Click options made from a config dataclass, so a field is a flag and `--help` is the code.

Field `name: T = default` with a docstring under it becomes `--name` (dashes for
underscores) whose help is that docstring and the default as the dataclass holds it.
`Literal` types become choices, `bool` a `--name/--no-name` switch, `dict` a JSON object,
`tuple[str, ...]` a repeatable flag, `X | None` an optional X. Every option defaults to None
("not given"), so `load_config` applies only the flags given, over the keys of a `--config`
file.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import json
import textwrap
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import click

from rlkd_cache.config import flag

F = TypeVar("F", bound=Callable[..., Any])


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` and of its dataclass bases, by field
    name, whitespace collapsed. Python keeps no field docstrings, so they are read from the
    classes' source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body  # type: ignore[attr-defined]
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def default_text(f: dataclasses.Field[Any]) -> str:
    """The field's default as the dataclass holds it (dicts as JSON); for a default factory
    that is a function, its docstring (for example "$RLKD_CACHE_ROOT, else ~/.cache/rlkd")."""
    factory = f.default_factory
    if factory is dataclasses.MISSING:
        value = f.default
    elif inspect.isfunction(factory) and factory.__doc__:
        return factory.__doc__.strip()
    else:
        value = factory()
    return json.dumps(value) if isinstance(value, dict) else str(value)


def json_object(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> dict[str, Any] | None:
    """Parse a flag that takes a JSON object (None when the flag is absent)."""
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not valid JSON ({e})", ctx=ctx, param=param) from None
    if not isinstance(parsed, dict):
        raise click.BadParameter(
            "expected a JSON object like '{\"key\": value}'", ctx=ctx, param=param
        )
    return parsed


def _option(f: dataclasses.Field[Any], hint: Any, doc: str) -> Callable[[F], F]:
    """The click option of one field (see the module docstring)."""
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        hint = next(a for a in args if a is not type(None))
    shown = "[required]" if f.metadata.get("required") else f"[default: {default_text(f)}]"
    decls = [flag(f.name), f.name]
    settings: dict[str, Any] = {"default": None, "help": f"{doc} {shown}".strip()}
    if typing.get_origin(hint) is Literal:
        settings["type"] = click.Choice(typing.get_args(hint))
    elif hint is bool:
        decls[0] = f"{flag(f.name)}/--no-{flag(f.name)[2:]}"
    elif typing.get_origin(hint) is dict:
        settings.update(metavar="JSON", callback=json_object)
    elif hint == tuple[str, ...]:  # a repeatable flag; not given: None, like the others
        settings.update(multiple=True, callback=lambda ctx, param, value: value or None)
    elif hint in (int, float, str):
        settings["type"] = hint
    else:
        raise TypeError(f"{f.name}: no click option for the type {hint!r}")
    return click.option(*decls, **settings)


def config_options(cls: type) -> Callable[[F], F]:
    """A decorator adding one option per field of config dataclass `cls`, in field order."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    options = [_option(f, hints[f.name], docs.get(f.name, "")) for f in dataclasses.fields(cls)]

    def add(command: F) -> F:
        for option in reversed(options):  # click lists the last-applied option first
            command = option(command)
        return command

    return add
