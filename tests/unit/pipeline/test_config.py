"""TrainConfig: recipes, dotted overrides, validation naming the field, the DeepSpeed JSON."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import re
import types
import typing
from pathlib import Path

import pytest

from modeling.config import ModelPreset
from common.config_loading import ConfigError, field_types
from pipeline.evaluation.config import EvalConfig
from pipeline.training.config import TrainConfig, load_train_config, parse_overrides
from pipeline.distributed import build_deepspeed_config, resolve_deepspeed_config

REPO = Path(__file__).resolve().parents[3]
TINY = str(REPO / "launch" / "recipes" / "tiny-cpu.yaml")
PAPER = str(REPO / "launch" / "recipes" / "fakereasoning-13b.yaml")


def test_tiny_recipe_loads_with_overrides():
    cfg = load_train_config(TINY, ["optim.lr=1e-4", "optim.betas=[0.9, 0.95]", "zero.stage=2",
                                   "checkpoint.resume=null", "model.llm.num_layers=3", "data.batch_size=2"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.zero.stage == 2 and cfg.checkpoint.resume is None
    assert cfg.model.llm.num_layers == 3 and cfg.model.image_size == 56  # tiny preset kept
    assert cfg.model_preset == "tiny" and cfg.precision == "fp32"
    assert cfg.data.batch_size == 2
    assert cfg.checkpoint_dir == os.path.join(cfg.output_dir, "checkpoints")


def test_paper_recipe_is_the_paper():
    cfg = load_train_config(PAPER, [])
    assert cfg.model.llm.hidden_size == 5120 and cfg.model.lora.r == 128 and cfg.model.lora.alpha == 256
    assert cfg.precision == "bf16" and cfg.zero.stage == 3
    assert (cfg.data.batch_size, cfg.loop.global_batch, cfg.loop.grad_accum) == (8, 128, None)
    for ranks, accumulation in ((8, 2), (16, 1), (4, 4)):  # the global batch survives a resize
        ds = build_deepspeed_config(cfg, world_size=ranks)
        assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (128, accumulation)
    assert (cfg.optim.lr, cfg.optim.projector_lr, cfg.optim.warmup_ratio, cfg.optim.weight_decay) == (
        2e-5, 2e-5, 0.03, 0.0)
    assert cfg.loop.epochs == 3 and cfg.loop.gradient_checkpointing
    assert cfg.data.max_length == 2048


def test_overrides_parse_yaml_values():
    assert parse_overrides(["a.b=1", "a.c=true", "d=null", "e=x=y"]) == {
        "a": {"b": 1, "c": True}, "d": None, "e": "x=y"}
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["optim.lr"])


@pytest.mark.parametrize("override, field", [
    ("optim.lrr=1", "optim.lrr"),
    ("optim.lr=fast", "optim.lr"),
    ("optim.lr=-1", "optim.lr"),
    ("zero.stage=4", "zero.stage"),
    ("wandb.mode=sometimes", "wandb.mode"),
    ("nonfinite=ignore", "nonfinite"),
    ("loop.grad_accum=0", "loop.grad_accum"),
    ("loop.gradient_checkpointing=yes please", "loop.gradient_checkpointing"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("checkpoint.resume=/does/not/exist", "checkpoint.resume"),
    ("data.batch_size=0", "data.batch_size"),
    ("model.llm.num_heads=3", "llm.num_heads"),
    ("model.preset=huge", "preset"),
    ("model.dtype=bfloat16", "precision"),  # fp32 training of bf16 weights
    ("distributed_timeout_s=0", "distributed_timeout_s"),
    ("distributed_timeout_s=-5", "distributed_timeout_s"),
    ("distributed_timeout_s=.inf", "distributed_timeout_s"),
    ("distributed_timeout_s=soon", "distributed_timeout_s"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_train_config(TINY, [override])
    assert field in str(e.value), str(e.value)
    assert "tiny-cpu.yaml" in str(e.value)


@pytest.mark.parametrize("overrides, field", [
    (["zero.stage=2", "zero.offload_param=cpu"], "zero.offload_param"),
    (["zero.stage=0", "zero.offload_optimizer=cpu"], "zero.offload_optimizer"),
    (["loop.epochs=null", "loop.max_steps=null"], "loop.max_steps"),
    (["data.max_length=1020"], "data.max_length"),
    (["tokenizer.vocab_size=100"], "tokenizer.vocab_size"),
])
def test_bad_combinations_fail_at_load(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_train_config(TINY, overrides)


# --------------------------------------------------------------------------- every field of every section
# Generated from the dataclasses (TrainConfig holds ModelConfig and DataConfig;
# EvalConfig the evaluation), so a new field is covered without listing it here.

def _fields(cls, prefix=""):
    """(dotted name, annotation) of every leaf field, and (dotted name, class) of every section."""
    leaves, sections = [], [(prefix, cls)]
    for name, tp in field_types(cls).items():
        dotted = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(tp):
            more_leaves, more_sections = _fields(tp, dotted)
            leaves += more_leaves
            sections += more_sections
        else:
            leaves.append((dotted, tp))
    return leaves, sections


TRAIN_LEAVES, TRAIN_SECTIONS = _fields(TrainConfig)
EVAL_LEAVES, EVAL_SECTIONS = _fields(EvalConfig)
# Values of every YAML kind; each field is fed those its annotation does not accept.
POOL = [5, 1.5, True, "lots", [5], ["a", 5], {"k": 5}, [0.5, 0.5, 0.5, 0.5]]


def _accepts(tp, v) -> bool:
    """The loader's rules, stated independently (see common/config_loading.py)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(v is None if a is type(None) else _accepts(a, v) for a in args)
    if origin is typing.Literal:
        return any(type(v) is type(a) and v == a for a in args)
    if origin in (list, tuple):
        if not isinstance(v, (list, tuple)):
            return False
        if origin is tuple and args[-1] is not Ellipsis:
            return len(v) == len(args) and all(_accepts(a, x) for a, x in zip(args, v))
        return all(_accepts(args[0], x) for x in v)
    if origin is dict:
        return isinstance(v, dict) and all(_accepts(args[0], k) and _accepts(args[1], x) for k, x in v.items())
    if tp is float:
        return type(v) in (int, float) or (isinstance(v, str) and _is_number(v))
    return type(v) is tp


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _literals(tp):
    """The Literal inside an annotation (Optional/union included), or None."""
    if typing.get_origin(tp) is typing.Literal:
        return tp
    return next((a for a in typing.get_args(tp) if typing.get_origin(a) is typing.Literal), None)


def _nested(dotted: str, value) -> dict:
    out = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _train_error(dotted: str, value) -> str:
    with pytest.raises(ConfigError) as e:
        load_train_config(TINY, [f"{dotted}={json.dumps(value)}"])
    return str(e.value)


def _eval_error(dotted: str, value) -> str:
    with pytest.raises(ConfigError) as e:
        EvalConfig.from_dict(_nested(dotted, value))
    return str(e.value)


def test_the_walk_reaches_every_section():
    names = {n for n, _ in TRAIN_SECTIONS}
    assert {"model", "model.clip", "model.dino", "model.llm", "model.lora", "model.fusion", "model.cpm",
            "data", "optim", "loop", "zero", "checkpoint", "wandb", "tokenizer", "perf"} <= names
    assert len(TRAIN_LEAVES) > 100 and {n for n, _ in EVAL_SECTIONS} == {"", "wandb"}


@pytest.mark.parametrize("dotted, tp", TRAIN_LEAVES + [("model.preset", ModelPreset | None)],
                         ids=[n for n, _ in TRAIN_LEAVES] + ["model.preset"])
def test_every_train_field_rejects_wrong_types_naming_it(dotted, tp):
    wrong = [v for v in POOL if not _accepts(tp, v)]
    assert wrong, f"{dotted}: the pool has no value its annotation {tp} rejects"
    for value in wrong:
        message = _train_error(dotted, value)
        assert dotted in message and "tiny-cpu.yaml" in message, (value, message)


@pytest.mark.parametrize("dotted, tp", EVAL_LEAVES, ids=[n for n, _ in EVAL_LEAVES])
def test_every_eval_field_rejects_wrong_types_naming_it(dotted, tp):
    wrong = [v for v in POOL if not _accepts(tp, v)]
    assert wrong, f"{dotted}: the pool has no value its annotation {tp} rejects"
    for value in wrong:
        message = _eval_error(dotted, value)
        assert dotted in message and "must be" in message, (value, message)


# model_preset is derived from model.preset: any value of it is refused as such (above).
TRAIN_ENUMS = [(n, _literals(t)) for n, t in TRAIN_LEAVES + [("model.preset", ModelPreset)]
               if _literals(t) and n != "model_preset"]
EVAL_ENUMS = [(n, _literals(t)) for n, t in EVAL_LEAVES if _literals(t)]


@pytest.mark.parametrize("dotted, choices", TRAIN_ENUMS + EVAL_ENUMS,
                         ids=[f"train:{n}" for n, _ in TRAIN_ENUMS] + [f"eval:{n}" for n, _ in EVAL_ENUMS])
def test_every_enum_rejects_a_value_outside_its_choices(dotted, choices):
    args = typing.get_args(choices)
    bad = max(args) + 1 if isinstance(args[0], int) else "no-such-choice"
    message = _eval_error(dotted, bad) if (dotted, choices) in EVAL_ENUMS else _train_error(dotted, bad)
    assert f"{dotted}={bad!r}: must be " in message and f"one of {list(args)}" in message, message


@pytest.mark.parametrize("section", [n for n, _ in TRAIN_SECTIONS], ids=lambda n: n or "top")
def test_every_train_section_rejects_unknown_keys(section):
    dotted = f"{section}.no_such_field" if section else "no_such_field"
    message = _train_error(dotted, 1)
    assert f"unknown field {dotted}" in message


@pytest.mark.parametrize("section", [n for n, _ in EVAL_SECTIONS], ids=lambda n: n or "top")
def test_every_eval_section_rejects_unknown_keys(section):
    dotted = f"{section}.no_such_field" if section else "no_such_field"
    assert f"unknown field {dotted}" in _eval_error(dotted, 1)


@pytest.mark.parametrize("override, message", [
    ("model.cpm.temperature=1e-4", None),  # YAML 1.1 string "1e-4": a number
    ("data.max_bad_fraction=1e-3", None),
    ("data.batch_size=true", "data.batch_size=True: must be an integer"),
    ("model.lora.r=1.5", "model.lora.r=1.5: must be an integer"),
    ("model=5", "model=5: must be a mapping of ModelConfig fields"),
    ("data=[1]", "data=[1]: must be a mapping of DataConfig fields"),
    ("data.max_bad_fraction=lots", "data.max_bad_fraction='lots': must be a number"),
    ("zero.stage=true", "zero.stage=True: must be one of [0, 1, 2, 3]"),
])
def test_the_reported_overrides(override, message):
    """The overrides the issue tried: floats stored as floats, the rest rejected by name."""
    if message is None:
        cfg = load_train_config(TINY, [override])
        assert type(cfg.model.cpm.temperature) is float and type(cfg.data.max_bad_fraction) is float
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_train_config(TINY, [override])


def test_eval_conversation_choices_are_the_templates():
    from modeling.template import CONVERSATIONS
    from pipeline.evaluation.config import Conversation

    assert set(typing.get_args(Conversation)) == set(CONVERSATIONS)


def test_clip_activation_choices_are_transformers_activations():
    from transformers.activations import ACT2FN

    from modeling.config import ClipTowerConfig

    assert set(typing.get_args(field_types(ClipTowerConfig)["hidden_act"])) <= set(ACT2FN)


def _config_classes():
    """Every config dataclass of every section, with their dataclass bases."""
    classes = {cls for _, cls in TRAIN_SECTIONS + EVAL_SECTIONS}
    return sorted({base for cls in classes for base in cls.__mro__ if dataclasses.is_dataclass(base)},
                  key=lambda c: (c.__module__, c.__name__))


def test_every_config_field_has_a_docstring():
    """Each field of every config dataclass (all sections) has a docstring right under it."""
    checked, missing = set(), []
    for cls in _config_classes():
        tree = ast.parse(Path(inspect.getsourcefile(cls)).read_text())
        node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
        body = node.body
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.AnnAssign):
                checked.add(f"{cls.__name__}.{stmt.target.id}")
                nxt = body[i + 1] if i + 1 < len(body) else None
                if not (isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                        and isinstance(nxt.value.value, str)):
                    missing.append(f"{cls.__name__}.{stmt.target.id}")
    assert not missing, missing
    assert {"DataConfig.max_bad_fraction", "VisionTowerConfig.path", "EvalConfig.protocol",
            "WandbConfig.mode", "CPMConfig.temperature"} <= checked


def test_generated_deepspeed_json():
    cfg = load_train_config(TINY, ["data.batch_size=4", "loop.grad_accum=3", "loop.grad_clip=0.5",
                                   "zero.offload_optimizer=cpu", "optim.weight_decay=0.1"])
    ds = build_deepspeed_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["weight_decay"] == 0.1
    json.dumps(ds)  # JSON-serialisable as written next to the checkpoints


def test_user_deepspeed_json_auto_values_and_conflicts(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                "zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW",
                                                                                 "params": {"lr": "auto"}}}))
    cfg = load_train_config(TINY, [f"zero.deepspeed_config={user}"])
    ds = resolve_deepspeed_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.batch_size
    assert ds["zero_optimization"] == {"stage": 2}, "the user's own ZeRO section is kept"
    assert ds["optimizer"]["params"]["lr"] == cfg.optim.lr
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 99}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        resolve_deepspeed_config(cfg, world_size=2)


def test_to_dict_round_trips_through_yaml(tmp_path):
    import yaml

    cfg = load_train_config(TINY, ["optim.lr=5e-4"])
    d = cfg.to_dict()
    d.pop("model_preset")
    d["model"] = {"preset": None, **d["model"]}
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(d))
    again = load_train_config(str(path), [])
    assert dataclasses.asdict(again.optim) == dataclasses.asdict(cfg.optim)
    assert again.model.to_dict() == cfg.model.to_dict()
    assert isinstance(again, TrainConfig)


def test_distributed_timeout_default_recipe_and_override():
    assert TrainConfig().distributed_timeout_s == 1800.0
    assert load_train_config(PAPER, []).distributed_timeout_s == 3600.0  # the 13B export on rank 0
    cfg = load_train_config(TINY, ["distributed_timeout_s=20"])
    assert cfg.distributed_timeout_s == 20.0 and isinstance(cfg.distributed_timeout_s, float)
