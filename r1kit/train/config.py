"""TOML recipes: read a file into a config dataclass, apply `key=value` overrides, check every key.

A recipe is flat `key = value` pairs named as the dataclass fields (TOML tables are allowed as
headings only to group keys for the reader: `[optim]` then `learning_rate = 2e-4` is the same as a
top-level `learning_rate`). An unknown key or a value of the wrong type is an error that names the
key and the file, because a typo in a recipe that silently falls back to a default costs a run.

Overrides come from the command line as `key=value`; the value is parsed as TOML (`lr=1e-4`,
`packing=false`, `train_files=["a.jsonl","b.jsonl"]`) and, failing that, taken as a plain string
(`output_dir=runs/x`).
"""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found; pass --config with a .toml file (see recipes/)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """["lr=1e-4", "packing=false", "output_dir=runs/x"] -> {"lr": 1e-4, "packing": False, ...}"""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value (e.g. learning_rate=1e-4)")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare string such as a path
        out[key.replace("-", "_")] = value
    return out


def flatten(table: dict[str, Any], field_names: set[str]) -> dict[str, Any]:
    """Lift keys out of heading tables; a table whose name is a field (a dict field) stays."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and key not in field_names:
            for sub_key, sub_value in value.items():
                flat[sub_key] = sub_value
        else:
            flat[key] = value
    return flat


def _type_ok(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Check (and gently coerce: int -> float, str -> [str]) a TOML value against a field type."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            ok, coerced = _type_ok(value, option)
            if ok:
                return True, coerced
        return False, value
    if annotation is type(None):
        return value is None, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    if origin is list or annotation is list:
        (inner,) = typing.get_args(annotation) or (Any,)
        if isinstance(value, str) and inner is str:
            return True, [value]
        if not isinstance(value, list):
            return False, value
        out = []
        for v in value:
            ok, c = _type_ok(v, inner)
            if not ok:
                return False, value
            out.append(c)
        return True, out
    if origin is dict or annotation is dict:
        return isinstance(value, dict), value
    return isinstance(value, annotation), value


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def check(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """Every key a field of dataclass `cls`, every value of its type; returns the coerced values."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = [n for n in fields if key.lower() in n or n in key.lower()][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"{source}: unknown key {key!r}{hint}; {cls.__name__} has no such setting")
        ok, coerced = _type_ok(value, hints[key])
        if not ok:
            raise ValueError(f"{source}: key {key!r} must be {_type_name(hints[key])}, got {value!r} "
                             f"({type(value).__name__})")
        kwargs[key] = coerced
    return kwargs


def build(cls: type[T], values: dict[str, Any], source: str) -> T:
    """Instantiate dataclass `cls` from `values`, naming `source` in every error."""
    kwargs = check(cls, values, source)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None


def load_recipe(cls: type[T], path: str | Path | None = None, overrides: list[str] | dict | None = None) -> T:
    """Read recipe `path` (optional) into `cls`, then apply overrides; errors name key and file."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = flatten(read_toml(path), names) if path else {}
    source = str(path) if path else "command line"
    check(cls, values, source)  # the file alone must be valid, so its errors name the file
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    check(cls, extra, "command-line override")
    return build(cls, {**values, **extra}, source)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_toml(config: Any) -> str:
    """The resolved recipe, written beside a run so it can be read and rerun."""
    lines = []
    for key, value in to_dict(config).items():
        if value is None:
            lines.append(f"# {key} = (unset)")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    return json.dumps(str(value))
