"""TrainConfig: recipes, dotted overrides, validation naming the field, the DeepSpeed JSON."""
from __future__ import annotations

import ast
import dataclasses
import json
import os
from pathlib import Path

import pytest

from pipeline.training.config import TrainConfig, TrainConfigError, load_train_config, parse_overrides
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
    assert (cfg.data.batch_size, cfg.loop.grad_accum) == (8, 2)
    assert build_deepspeed_config(cfg, world_size=8)["train_batch_size"] == 128
    assert (cfg.optim.lr, cfg.optim.projector_lr, cfg.optim.warmup_ratio, cfg.optim.weight_decay) == (
        2e-5, 2e-5, 0.03, 0.0)
    assert cfg.loop.epochs == 3 and cfg.loop.gradient_checkpointing
    assert cfg.data.max_length == 2048


def test_overrides_parse_yaml_values():
    assert parse_overrides(["a.b=1", "a.c=true", "d=null", "e=x=y"]) == {
        "a": {"b": 1, "c": True}, "d": None, "e": "x=y"}
    with pytest.raises(TrainConfigError, match="not key=value"):
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
    with pytest.raises(TrainConfigError) as e:
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
    with pytest.raises(TrainConfigError, match=field.replace(".", r"\.")):
        load_train_config(TINY, overrides)


def test_every_config_field_has_a_docstring():
    """The typed config documents each field (a docstring right under it)."""
    files = ["pipeline/training/config.py", "pipeline/training/config_sections.py", "pipeline/tracking.py"]
    nodes = [n for f in files for n in ast.parse((REPO / f).read_text()).body]
    missing = []
    for node in nodes:
        if not (isinstance(node, ast.ClassDef) and any(
                getattr(d, "id", None) == "dataclass" for d in node.decorator_list)):
            continue
        body = node.body
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                if not (isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                        and isinstance(nxt.value.value, str)):
                    missing.append(f"{node.name}.{stmt.target.id}")
    assert not missing, missing


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
    with pytest.raises(TrainConfigError, match="train_micro_batch_size_per_gpu"):
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
