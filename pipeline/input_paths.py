"""Every input path of a training or an evaluation run, checked before anything starts.

`launch/train.py` runs `check_train_inputs` after the recipe is loaded, for
`--check` and at start-up alike; `EvalConfig.validate` runs `check_eval_inputs`.
Each error is a ConfigError naming the field, the path and the kind expected
(shard set, model folder, tokenizer folder, weight file), and a damaged
safetensors file by its own path (modeling.input_paths has the kinds).
Output paths (output_dir, out) are not inputs: they are created.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from modeling.config_loading import ConfigError
from modeling.input_paths import (
    TOKENIZER_FOLDER,
    PathKind,
    check_model_paths,
    check_safetensors_headers,
    require,
    require_model_folder,
)
from pipeline.data.shards import discover_shards

if TYPE_CHECKING:
    from pipeline.evaluation.config import EvalConfig
    from pipeline.training.config import TrainConfig

# The three formats load_for_inference / import_reference read all have one of these.
CHECKPOINT_FOLDER = PathKind("a checkpoint folder", True, ("config.json", "model_config.json"))
ANY_FOLDER = PathKind("a folder", True)


def _named(field: str, value: str, exc: Exception) -> ConfigError:
    """`exc` as a ConfigError that names the field once (some messages already do)."""
    text = str(exc)
    return ConfigError(text if text.startswith(f"{field}=") else f"{field}={value!r}: {text}")


def check_shard_set(field: str, spec: str, sizes_file: str | None = None) -> None:
    """A training shard set: its sizes.json read and every listed local shard present."""
    try:
        discover_shards(spec, sizes_file)
    except (OSError, ValueError) as exc:
        raise _named(field, spec, exc) from None


def check_train_inputs(cfg: TrainConfig) -> None:
    """The model's paths, the tokenizer folder and the training shards.
    (checkpoint.resume and zero.deepspeed_config are checked by TrainConfig.validate.)"""
    check_model_paths(cfg.model)
    if cfg.tokenizer.path is not None:
        require("tokenizer.path", cfg.tokenizer.path, TOKENIZER_FOLDER)
    check_shard_set("data.train_shards", cfg.data.train_shards, cfg.data.sizes_file)


def check_eval_set(field: str, root: str) -> None:
    """An evaluation set: a folder holding shard sets (a sizes.json in it or below), each complete."""
    from pipeline.evaluation.data import shard_set_dirs

    require(field, root, ANY_FOLDER)
    try:
        for d in shard_set_dirs(root):
            discover_shards(d)
    except (OSError, ValueError) as exc:
        raise _named(field, root, exc) from None


def check_eval_inputs(cfg: EvalConfig) -> None:
    """The checkpoint (kind, and the header of each of its safetensors files), every
    set's shards, the CSS model and a reference LoRA output's base model."""
    folder = require("checkpoint", cfg.checkpoint, CHECKPOINT_FOLDER)
    check_safetensors_headers("checkpoint", sorted(Path(folder).glob("*.safetensors")))
    for name, root in cfg.sets().items():
        field = "shards" if cfg.shards and name == cfg.set_name else f"benchmarks.{name}"
        check_eval_set(field, root)
    if cfg.css_model is not None:
        require_model_folder("css_model", cfg.css_model)
    if cfg.reference_base_model is not None:
        require_model_folder("reference_base_model", cfg.reference_base_model)
