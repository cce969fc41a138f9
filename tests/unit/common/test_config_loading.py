"""The typed config loader (common.config_loading): coercion rules, messages, sections."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from modeling.config import ModelConfig
from common.config_loading import (
    ConfigError,
    apply_section,
    check_fields,
    coerce,
    deep_merge,
    load_section,
    parse_overrides,
    read_yaml_mapping,
)


@pytest.mark.parametrize("value, tp, expected", [
    (3, int, 3),
    (3, float, 3.0),
    ("1e-3", float, 1e-3),      # YAML 1.1 reads 1e-3 (no dot) as a string
    (" 2.5 ", float, 2.5),
    (True, bool, True),
    ("x", str, "x"),
    (None, int | None, None),
    ([0.9, 1], tuple[float, float], (0.9, 1.0)),
    ([1, 2], list[int], [1, 2]),
    ({"a": "b"}, dict[str, str], {"a": "b"}),
    (2, Literal[0, 1, 2, 3], 2),
    ("all-linear", Literal["all-linear"] | list[str], "all-linear"),
    (["q_proj"], Literal["all-linear"] | list[str], ["q_proj"]),
])
def test_accepted_values_are_coerced(value, tp, expected):
    got = coerce(value, tp, "f")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value, tp, message", [
    (True, int, "f=True: must be an integer"),
    (1.5, int, "f=1.5: must be an integer"),
    ("3", int, "f='3': must be an integer"),
    ("lots", float, "f='lots': must be a number"),
    (True, float, "f=True: must be a number"),
    ("nan", float, "f='nan': must be a number"),
    ("false", bool, "f='false': must be true or false"),
    (0, bool, "f=0: must be true or false"),
    (5, str, "f=5: must be a string"),
    (None, int, "f=None: must be an integer"),
    (1.5, int | None, "f=1.5: must be an integer or null"),
    (True, Literal[0, 1, 2, 3], "f=True: must be one of [0, 1, 2, 3]"),  # True == 1, but not a stage
    ("big", Literal["a", "b"], "f='big': must be one of ['a', 'b']"),
    ([0.9], tuple[float, float], "f=[0.9]: must be a list of 2 values (a number, a number)"),
    ([1, "x"], list[int], "f[1]='x': must be an integer"),
    ("q_proj", list[str], "f='q_proj': must be a list of strings"),
    ({"a": 5}, dict[str, str], "f.a=5: must be a string"),
    (3, Literal["all-linear"] | list[str], "f=3: must be one of ['all-linear'] or a list of strings"),
])
def test_rejected_values_name_the_field_value_and_what_is_allowed(value, tp, message):
    with pytest.raises(ConfigError) as e:
        coerce(value, tp, "f")
    assert str(e.value) == message


def test_an_unsupported_annotation_is_a_programming_error():
    with pytest.raises(TypeError, match="does not support"):
        coerce(1, set[int], "f")


@dataclass
class _Inner:
    n: int = 1
    """n."""


@dataclass
class _Outer:
    x: float = 0.5
    """x."""
    inner: _Inner = field(default_factory=_Inner)
    """inner."""


def test_sections_nested_partial_base_and_renames():
    base = _Outer(x=2.0, inner=_Inner(n=7))
    got = load_section(_Outer, {"inner": {"n": 3}}, "sec", base=base)
    assert got == _Outer(x=2.0, inner=_Inner(n=3)) and base.inner.n == 7  # base untouched
    assert load_section(_Outer, {"inner": None}, "sec") == _Outer()  # null section: defaults
    with pytest.raises(ConfigError, match=r"^sec\.inner=5: must be a mapping of _Inner fields$"):
        load_section(_Outer, {"inner": 5}, "sec")
    with pytest.raises(ConfigError, match=r"^sec=\[1\]: must be a mapping of _Outer fields$"):
        load_section(_Outer, [1], "sec")
    with pytest.raises(ConfigError, match=r"unknown field sec\.inner\.m \(known in sec\.inner: \['n'\]\)"):
        load_section(_Outer, {"inner": {"m": 1}}, "sec")
    with pytest.raises(ConfigError, match=r"sec\.y was renamed to sec\.x"):
        apply_section(_Outer(), {"y": 1}, "sec", {"sec.y": "sec.x"})


def test_check_fields_holds_built_objects_to_the_same_types():
    obj = _Outer(x=1, inner=_Inner(n=2))
    assert check_fields(obj, "sec").x == 1.0 and type(obj.x) is float
    obj.inner.n = "2"
    with pytest.raises(ConfigError, match=r"^sec\.inner\.n='2': must be an integer$"):
        check_fields(obj, "sec")


def test_model_config_from_dict_goes_through_the_loader():
    tiny = ModelConfig.preset("tiny")
    cfg = ModelConfig.from_dict({"cpm": {"temperature": "1e-4"}, "lora": {"dropout": 0}}, base=tiny)
    assert cfg.cpm.temperature == 1e-4 and type(cfg.lora.dropout) is float
    # A checkpoint's saved config (lists from JSON) reads back equal, tuples included.
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"^model\.lora\.r=1\.5: must be an integer$"):
        ModelConfig.from_dict({"lora": {"r": 1.5}}, base=tiny)
    with pytest.raises(ConfigError, match=r"^model\.llm=5: must be a mapping of LLMConfig fields$"):
        ModelConfig.from_dict({"llm": 5}, base=tiny)


def test_overrides_and_recipe_files(tmp_path):
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d="]) == {"a": {"b": 1, "c": [1, 2]}, "d": ""}
    for bad, why in (("a", "not key=value"), ("a..b=1", "empty field name"), ("a=[1", "not valid YAML")):
        with pytest.raises(ConfigError, match=why):
            parse_overrides([bad])
    with pytest.raises(ConfigError, match="was already set to a scalar"):
        parse_overrides(["a=1", "a.b=2"])
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}, "d": 4}) == {"a": {"b": 3, "c": 2}, "d": 4}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("")
    assert read_yaml_mapping(str(recipe)) == {}
    recipe.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"r\.yaml: top level must be a mapping, got list"):
        read_yaml_mapping(str(recipe))
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml_mapping(str(tmp_path / "absent.yaml"))
    with pytest.raises(ConfigError, match="is a directory"):
        read_yaml_mapping(str(tmp_path))
