"""Generic recipe machinery: dotted `key=value` overrides parsed as YAML, merged over
the recipe, and nested dicts coerced into typed dataclasses, each value checked
against its field's annotation with the dotted field named in the error."""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from typing import Any, Literal

import yaml

from pipeline.training.config_sections import TrainConfigError


def parse_overrides(items: list[str]) -> dict:
    """["a.b=1", "c=x"] -> {"a": {"b": 1}, "c": "x"}; values are parsed as YAML."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise TrainConfigError(f"override {item!r} is not key=value (e.g. optim.lr=1e-4)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise TrainConfigError(f"override {item!r}: empty field name")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise TrainConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise TrainConfigError(f"override {item!r}: {p} was already set to a scalar")
            node = nxt
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# Fields that were renamed: an old recipe fails with the new name instead of "unknown field".
RENAMED_FIELDS = {
    "schedule": "loop",
    "optim.schedule": "optim.lr_schedule",
}


def _build(cls, data: dict, prefix: str, preset_fields: dict | None = None):
    if not isinstance(data, dict):
        raise TrainConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    for name in unknown:
        if f"{prefix}{name}" in RENAMED_FIELDS:
            raise TrainConfigError(f"{prefix}{name} was renamed to {RENAMED_FIELDS[prefix + name]}: "
                                   f"rename the key in the recipe or override")
    if unknown:
        raise TrainConfigError(f"unknown field {prefix}{unknown[0]} (known in {prefix.rstrip('.') or 'top level'}: "
                               f"{sorted(fields)})")
    kwargs = dict(preset_fields or {})
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, f"{name}.")
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise TrainConfigError(f"{name} must not be null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except TrainConfigError as e:
                errors.append(str(e))
        raise TrainConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise TrainConfigError(f"{name}={value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TrainConfigError(f"{name} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise TrainConfigError(f"{name} must have {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        seq = [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(seq) if origin is tuple else seq
    if tp is bool:
        if not isinstance(value, bool):
            raise TrainConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TrainConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TrainConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TrainConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value
