"""The bridge from the pydantic request models to argparse: options, their help with bounds and choices, and
one-line descriptions of what is wrong with a request (a flag's or a file's)."""

from __future__ import annotations

import argparse
import difflib
import functools
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from recast.tasks.errors import first_error


def _extra(field) -> dict:
    """The CLI hints of a field: its json_schema_extra dict, or those a ConfiguredChoices hook carries."""
    extra = field.json_schema_extra if field is not None else None
    if isinstance(extra, dict):
        return dict(extra)
    return dict(getattr(extra, "cli", None) or {})


def _flag(name: str, extra: dict) -> str:
    return extra.get("cli") or "--" + name.replace("_", "-")


def _unwrap(annotation) -> tuple[type, bool]:
    """(scalar type, is_list) of a field annotation such as `list[int] | None`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        inner = typing.get_args(annotation)[0]
        inner = typing.get_args(inner)[0] if typing.get_origin(inner) is typing.Annotated else inner
        return inner, True
    return annotation, False


@functools.lru_cache(maxsize=None)
def _properties(model: type[BaseModel]) -> dict:
    """The model's JSON-schema properties, made once per model (every command builds the parser: per field it cost
    ~0.5 s of each command's start)."""
    return model.model_json_schema()["properties"]


def _bounds(model: type[BaseModel], name: str) -> dict:
    """The field's JSON-schema bounds (minimum, maximum), looking through Optional and list wrappers."""
    schema = _properties(model).get(name, {})
    candidates = [schema, schema.get("items", {}), *schema.get("anyOf", []),
                  *[s.get("items", {}) for s in schema.get("anyOf", [])]]
    return next((s for s in candidates if "minimum" in s or "maximum" in s), {})


def _help(model: type[BaseModel], name: str, field) -> str:
    """The field's description, with its bounds and configured choices spelled out."""
    text = field.description or ""
    bounds = _bounds(model, name)
    if "minimum" in bounds and "maximum" in bounds:
        text += f" [{bounds['minimum']}..{bounds['maximum']}]"
    hook = field.json_schema_extra
    if hasattr(hook, "kind") and callable(getattr(hook, "values", None)):  # a ConfiguredChoices hook, not a dict
        try:
            values = ", ".join(hook.values())
        except Exception:  # noqa: BLE001 - help must print even when the configuration does not load
            values = None
        if values and hook.kind == "storage_root":
            # The CLI writes where its user says; only runs from the UI or a schedule are held to these.
            text += f" [configured roots: {values}; the CLI may name any folder or URI]"
        elif values:
            text += f" [choices: {values}]"
    return text.replace("%", "%%")


def add_model_arguments(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    for name, field in model.model_fields.items():
        extra = _extra(field)
        scalar, is_list = _unwrap(field.annotation)
        help_text = _help(model, name, field)
        if extra.get("cli") == "positional-one":
            parser.add_argument(name, metavar=extra.get("metavar"), help=help_text)
            continue
        if extra.get("cli") == "positional":
            parser.add_argument(name, nargs="*", metavar=extra.get("metavar"), help=help_text)
            parser.add_argument("--" + name.rstrip("s"), dest=f"{name}_option", action="append", default=[],
                                metavar="PATH", help=f"same as {extra.get('metavar', name)} (repeatable)")
            continue
        kwargs: dict[str, Any] = dict(dest=name, help=help_text, default=argparse.SUPPRESS)
        if typing.get_origin(scalar) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(scalar))
        elif scalar is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = scalar if scalar in (int, float) else str
            kwargs["metavar"] = extra.get("metavar")
            if is_list:
                kwargs["action"] = "append"
        parser.add_argument(_flag(name, extra), **kwargs)


def model_from_args(model: type[BaseModel], args: argparse.Namespace) -> BaseModel:
    values = {}
    for name, field in model.model_fields.items():
        if _extra(field).get("cli") == "positional":
            values[name] = list(getattr(args, name)) + list(getattr(args, f"{name}_option"))
        elif hasattr(args, name):
            value = getattr(args, name)
            item, is_list = _unwrap(field.annotation)
            if is_list and isinstance(item, type) and hasattr(item, "parse_cli"):
                value = [item.parse_cli(v) for v in value]
            values[name] = value
    return model.model_validate(values)


def describe_validation_error(model: type[BaseModel], exc: ValidationError) -> str:
    """One line: the CLI flag, the value received, what is wrong and how to fix it."""
    where, value, message, kind = first_error(exc)
    name = where.split(".")[0] or "request"
    field = model.model_fields.get(name)
    extra = _extra(field)
    positional = extra.get("cli", "").startswith("positional")
    flag = extra.get("metavar", name) if positional else _flag(name, extra)
    bounds = _bounds(model, name)
    if "minimum" in bounds and "maximum" in bounds:
        fix = f"use a value from {bounds['minimum']} to {bounds['maximum']}"
    elif kind in ("too_short", "string_too_short", "missing"):
        fix = f"give a non-empty {flag}"
    elif kind == "too_long":
        fix = f"give at most {exc.errors()[0].get('ctx', {}).get('max_length')} values for {flag}"
    else:
        fix = f"see `recast {model.__name__.removesuffix('Request').lower()} --help`"
    shown = value if not isinstance(value, (dict, BaseModel)) else "(missing)"
    return f"{flag}={shown!r}: {message}; fix: {fix}"


def describe_file_error(path: str, model: type[BaseModel], exc: ValidationError) -> str:
    """One line for a YAML file that does not validate: the file, where in it (scene 2, key ...), what is wrong,
    and the fix. A misspelt key is reported as such, with the nearest known key, before the 'missing' error it
    causes."""
    errors = exc.errors()
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = list(error["loc"])
    where = _where(loc)
    owner = _model_at(model, loc[:-1])
    key = str(loc[-1]) if loc else ""
    known = list(owner.model_fields) if owner is not None else []
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        fix = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
        return f"{path}: {where}unknown key '{key}'; fix: {fix} (see `recast storyboard --help`)"
    if error["type"] == "missing":
        return f"{path}: {where}missing key '{key}'; fix: add {key}: ... (see `recast storyboard --help`)"
    return (f"{path}: {where}{key}={error.get('input')!r}: {error['msg']}; fix: see `recast storyboard --help` "
            "for each key's bounds")


def _where(loc: list) -> str:
    """'scenes[1] (scene 2): ' for ['scenes', 1, 'motion_prompt']; '' at the top level."""
    parts = []
    for index, part in enumerate(loc[:-1]):
        if isinstance(part, int):
            parts.append(f"[{part}] (scene {part + 1})" if loc[index - 1] == "scenes" else f"[{part}]")
        else:
            parts.append(("." if parts else "") + str(part))
    return "".join(parts) + ": " if parts else ""


def _model_at(model: type[BaseModel], loc: list) -> type[BaseModel] | None:
    """The model that holds the key at `loc` (following list items and nested models)."""
    current = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        inner, _ = _unwrap(field.annotation)
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return None
        current = inner
    return current


def yaml_keys_help(model: type[BaseModel], indent: str = "  ") -> str:
    """The keys of a YAML file the model reads, with their descriptions (for --help)."""
    lines = []
    for name, field in model.model_fields.items():
        lines.append(f"{indent}{name}: {_help(model, name, field)}")
        inner, is_list = _unwrap(field.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            lines.append(yaml_keys_help(inner, indent + "    "))
    return "\n".join(lines)
