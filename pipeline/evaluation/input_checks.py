"""Every input path of an evaluation, checked before anything is read.

`EvalConfig.validate` runs `check_eval_inputs`: the checkpoint (its kind, and
the header of each of its safetensors files), every set's shards, the CSS model
and a reference LoRA output's base model. Each error is a ConfigError naming the
field, the path and the kind expected (pipeline/input_paths.py has the kinds
shared with training).
"""
from __future__ import annotations

from pathlib import Path

from modeling.checkpoints.input_paths import check_safetensors_headers, require, require_model_folder
from pipeline.data.shards import discover_shards
from pipeline.evaluation.data import shard_set_dirs
from pipeline.input_paths import ANY_FOLDER, CHECKPOINT_FOLDER, field_error


def check_eval_set(field: str, root: str) -> None:
    """An evaluation set: a folder holding shard sets (a sizes.json in it or below), each complete."""
    require(field, root, ANY_FOLDER)
    try:
        for d in shard_set_dirs(root):
            discover_shards(d)
    except (OSError, ValueError) as exc:
        raise field_error(field, root, exc) from None


def check_eval_inputs(cfg) -> None:
    """The input paths of `cfg`, an EvalConfig (this module sits below
    pipeline.evaluation.config, which calls it, so it does not import the class)."""
    folder = require("checkpoint", cfg.checkpoint, CHECKPOINT_FOLDER)
    check_safetensors_headers("checkpoint", sorted(Path(folder).glob("*.safetensors")))
    for name, root in cfg.sets().items():
        field = "shards" if cfg.shards and name == cfg.set_name else f"benchmarks.{name}"
        check_eval_set(field, root)
    if cfg.css_model is not None:
        require_model_folder("css_model", cfg.css_model)
    if cfg.reference_base_model is not None:
        require_model_folder("reference_base_model", cfg.reference_base_model)
