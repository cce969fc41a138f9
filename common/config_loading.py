"""The one typed loader of every configuration section (train, model, data, eval).

A section is a dataclass whose fields are annotated with the types below; a
recipe is YAML plus dotted `key=value` overrides (values parsed as YAML too).
Every value is coerced and checked against its field's annotation, and every
error is a `ConfigError` naming the dotted field, the value and what is
allowed, e.g. `data.max_bad_fraction='lots': must be a number`.

Supported annotations: int (not bool, not 1.5), float (ints, and the strings
YAML 1.1 reads "1e-3" as), bool (true/false only), str, Literal[...] (the
choices, type included: True is not 1), X | None, list[X], tuple[X, ...],
fixed tuples, dict[K, V], and nested dataclasses (a mapping of their fields).
Any other annotation is a programming error (TypeError), so no field escapes
the check.

Range checks and combinations stay in each section's `validate()`; this module
only knows types. It sits in `modeling/` (dependencies: yaml) because
ModelConfig.from_dict, which reads a checkpoint's saved model config, goes
through it as the recipes do.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the dotted field, the value and what is allowed."""


def field_error(name: str, value: Any, allowed: str) -> ConfigError:
    """The standard message: `name=value: must be allowed`."""
    return ConfigError(f"{name}={value!r}: must be {allowed}")


# --------------------------------------------------------------------------- YAML and overrides

def read_yaml_mapping(path: str) -> dict:
    """A recipe file's top-level mapping ({} for an empty file), errors naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"recipe {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"recipe {path} is a directory, expected a YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def parse_overrides(items: list[str]) -> dict:
    """["a.b=1", "c=x"] -> {"a": {"b": 1}, "c": "x"}; values are parsed as YAML."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=1e-4)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if any(not p for p in parts):
            raise ConfigError(f"override {item!r}: empty field name")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p} was already set to a scalar")
            node = nxt
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base`, mappings key by key, anything else replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# --------------------------------------------------------------------------- sections

def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation of a config dataclass (init fields only)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _dotted(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def apply_section(obj: Any, data: Any, prefix: str, renamed: dict[str, str] | None = None) -> Any:
    """Set the fields named in `data` (a mapping, possibly partial) on the dataclass
    instance `obj`, in place, each coerced to its annotation; returns `obj`.

    Nested dataclass fields take a mapping (applied over their current value) or
    null (left as they are). `renamed`: dotted old name -> new name, so that an
    old recipe fails with the new name rather than "unknown field".
    """
    if not isinstance(data, dict):
        raise field_error(prefix or "config", data, f"a mapping of {type(obj).__name__} fields")
    types_ = field_types(type(obj))
    for key, value in data.items():
        name = _dotted(prefix, str(key))
        if key not in types_:
            raise _unknown(name, prefix, types_, renamed or {})
        if dataclasses.is_dataclass(types_[key]):
            if value is not None:
                apply_section(getattr(obj, key), value, name, renamed)
        else:
            setattr(obj, key, coerce(value, types_[key], name))
    return obj


def load_section(cls: type, data: Any, prefix: str, base: Any = None,
                 renamed: dict[str, str] | None = None) -> Any:
    """A new `cls` from `data` over a copy of `base` (default: the dataclass defaults)."""
    obj = copy.deepcopy(base) if base is not None else cls()
    return apply_section(obj, {} if data is None else data, prefix, renamed)


def check_fields(obj: Any, prefix: str) -> Any:
    """Check every field of an already built section (and its nested ones) against
    its annotation, storing the coerced value (e.g. an int given to a float
    field becomes a float): `validate()` calls it, so a config built in Python
    is held to the same types as one read from a recipe."""
    for name, tp in field_types(type(obj)).items():
        value = getattr(obj, name)
        dotted = _dotted(prefix, name)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, tp):
                raise field_error(dotted, value, f"a {tp.__name__}")
            check_fields(value, dotted)
        else:
            setattr(obj, name, coerce(value, tp, dotted))
    return obj


def _unknown(name: str, prefix: str, types_: dict, renamed: dict[str, str]) -> ConfigError:
    if name in renamed:
        return ConfigError(f"{name} was renamed to {renamed[name]}: rename the key in the recipe or override")
    return ConfigError(f"unknown field {name} (known in {prefix or 'the top level'}: {sorted(types_)})")


# --------------------------------------------------------------------------- values

def describe(tp: Any) -> str:
    """What an annotation allows, in words (the end of an error message)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in sorted(args, key=lambda a: a is type(None)))
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (list, tuple) and (not args or args[-1] is Ellipsis or origin is list):
        return f"a list of {_plural(args[0]) if args else 'values'}"
    if origin is tuple:
        return f"a list of {len(args)} values ({', '.join(describe(a) for a in args)})"
    if origin is dict:
        return f"a mapping of {_plural(args[0])} to {_plural(args[1])}" if args else "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return _SCALARS[tp][0] if tp in _SCALARS else repr(tp)


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", bool: "booleans", str: "strings"}.get(tp, describe(tp))


def coerce(value: Any, tp: Any, name: str) -> Any:
    """`value` as annotation `tp` requires, or a ConfigError naming `name`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, args, name)
    if origin is Literal:
        # `True == 1`: compare the type as well, so that a bool is not a stage number.
        for choice in args:
            if type(value) is type(choice) and value == choice:
                return choice
        raise field_error(name, value, describe(tp))
    if origin in (list, tuple):
        return _coerce_sequence(value, tp, origin, args, name)
    if origin is dict:
        if not isinstance(value, dict):
            raise field_error(name, value, describe(tp))
        key_tp, value_tp = args or (Any, Any)
        return {coerce(k, key_tp, f"{name} key {k!r}"): coerce(v, value_tp, f"{name}.{k}") for k, v in value.items()}
    if tp in _SCALARS:
        return _SCALARS[tp][1](value, name)
    raise TypeError(f"{name}: the config loader does not support the annotation {tp!r}")


def _coerce_union(value: Any, tp: Any, args: tuple, name: str) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise field_error(name, value, describe(tp))
    for alternative in args:
        if alternative is type(None):
            continue
        try:
            return coerce(value, alternative, name)
        except ConfigError:
            continue
    raise field_error(name, value, describe(tp))


def _coerce_sequence(value: Any, tp: Any, origin: type, args: tuple, name: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise field_error(name, value, describe(tp))
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise field_error(name, value, describe(tp))
        return tuple(coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    item = args[0] if args else Any
    items = [coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise field_error(name, value, "an integer")
    return value


def _as_float(value: Any, name: str) -> float:
    number = value
    if isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string; only number spellings are taken.
        try:
            number = float(value.strip())
        except ValueError:
            raise field_error(name, value, "a number") from None
    # NaN passes every range check (all comparisons are false), so it is no number here.
    if isinstance(number, bool) or not isinstance(number, (int, float)) or math.isnan(number):
        raise field_error(name, value, "a number")
    return float(number)


def _as_bool(value: Any, name: str) -> bool:
    # A string "false" would count as true; 0/1 are not booleans in a recipe either.
    if not isinstance(value, bool):
        raise field_error(name, value, "true or false")
    return value


def _as_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise field_error(name, value, "a string")
    return value


_SCALARS: dict[Any, tuple[str, Any]] = {
    int: ("an integer", _as_int),
    float: ("a number", _as_float),
    bool: ("true or false", _as_bool),
    str: ("a string", _as_str),
}
