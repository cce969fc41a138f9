"""The DeepSpeed JSON: generated from the TrainConfig, or the user's own
(`zero.deepspeed_config`) with its "auto" values filled and its batch,
clipping and precision checked against the TrainConfig; the universal-load switch."""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from common.atomic_files import write_atomic
from pipeline.training.batch import plan_for
from pipeline.training.config import TrainConfig, TrainConfigError


def build_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON for `cfg` on `world_size` ranks (ConfigError when
    loop.global_batch does not divide on them)."""
    z = cfg.zero
    o = cfg.optim
    mb = cfg.data.batch_size
    ga = plan_for(cfg, world_size).grad_accum
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": ga,
        "train_batch_size": mb * ga * world_size,
        "gradient_clipping": cfg.loop.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay},
        },
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        # The training loop logs; DeepSpeed's own per-step prints would flood the console.
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"tag_validation": "FAIL"},
    }
    zo: dict[str, Any] = {"stage": z.stage}
    if z.stage >= 1:
        zo.update(overlap_comm=z.overlap_comm, reduce_bucket_size=z.reduce_bucket_size,
                  contiguous_gradients=True)
    if z.stage == 3:
        zo.update(stage3_prefetch_bucket_size=z.stage3_prefetch_bucket_size,
                  stage3_param_persistence_threshold=z.stage3_param_persistence_threshold,
                  # Rank 0 writes the merged model from gathered params, not from this.
                  stage3_gather_16bit_weights_on_model_save=False)
    if z.offload_optimizer == "cpu":
        zo["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if z.offload_param == "cpu":
        zo["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds["zero_optimization"] = zo
    return ds


def resolve_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The generated JSON, or the user's `zero.deepspeed_config` with "auto"
    values filled from `cfg` and conflicting values refused by name."""
    generated = build_deepspeed_config(cfg, world_size)
    if cfg.zero.deepspeed_config is None:
        return generated
    path = cfg.zero.deepspeed_config
    try:
        with open(path, encoding="utf-8") as f:
            user = json.load(f)
    except json.JSONDecodeError as e:
        raise TrainConfigError(f"zero.deepspeed_config: {path} is not valid JSON ({e})") from None
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping"):
        if user.get(key, "auto") == "auto":
            user[key] = generated[key]
        elif user[key] != generated[key]:
            raise TrainConfigError(
                f"zero.deepspeed_config: {path} sets {key}={user[key]} but the training config gives "
                f"{generated[key]} (data.batch_size, loop.grad_accum or loop.global_batch, loop.grad_clip, world size); "
                "use \"auto\" or make them agree")
    for key in ("bf16", "fp16"):
        section = user.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = generated[key]["enabled"]
        elif bool(section["enabled"]) != generated[key]["enabled"]:
            raise TrainConfigError(f"zero.deepspeed_config: {path} has {key}.enabled={section['enabled']} "
                                   f"but precision={cfg.precision}")
    opt = user.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        for k, v in generated["optimizer"]["params"].items():
            if params.get(k, "auto") == "auto":
                params[k] = v
    user.setdefault("zero_optimization", generated["zero_optimization"])
    user.setdefault("steps_per_print", generated["steps_per_print"])
    user.setdefault("zero_allow_untested_optimizer", True)
    return user


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def write_deepspeed_config(ds_config: dict, directory: str) -> str:
    """Write ds_config.json next to the checkpoints (rank 0 only calls this)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "ds_config.json")
    write_atomic(path, json.dumps(ds_config, indent=2, sort_keys=True))
    return path


def enable_universal_load(ds_config: dict) -> dict:
    """Ask DeepSpeed to load a universal checkpoint (one that can be loaded on any
    number of ranks) with the next `engine.load_checkpoint`; it must be set before
    `deepspeed.initialize`, since the engine reads it from its config."""
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return ds_config
