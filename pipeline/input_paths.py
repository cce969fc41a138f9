"""Every input path of a training or an evaluation run, checked before anything starts.

`launch/train.py` runs `check_train_inputs` after the recipe is loaded, for
`--check` and at start-up alike; an evaluation's checks build on the kinds here
(pipeline/evaluation/input_checks.py, run by `EvalConfig.validate`).
Each error is a ConfigError naming the field, the path and the kind expected
(shard set, model folder, tokenizer folder, weight file), and a damaged
safetensors file by its own path (modeling.checkpoints.input_paths has the kinds).
Output paths (output_dir, out) are not inputs: they are created.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from common.config_loading import ConfigError
from modeling.checkpoints.input_paths import TOKENIZER_FOLDER, PathKind, check_model_paths, require
from pipeline.data.shards import discover_shards

if TYPE_CHECKING:
    from pipeline.training.config import TrainConfig

# The three formats load_for_inference / import_reference read all have one of these.
CHECKPOINT_FOLDER = PathKind("a checkpoint folder", True, ("config.json", "model_config.json"))
ANY_FOLDER = PathKind("a folder", True)


def field_error(field: str, value: str, exc: Exception) -> ConfigError:
    """`exc` as a ConfigError that names the field once (some messages already do)."""
    text = str(exc)
    return ConfigError(text if text.startswith(f"{field}=") else f"{field}={value!r}: {text}")


def check_shard_set(field: str, spec: str, sizes_file: str | None = None) -> None:
    """A training shard set: its sizes.json read and every listed local shard present."""
    try:
        discover_shards(spec, sizes_file)
    except (OSError, ValueError) as exc:
        raise field_error(field, spec, exc) from None


def check_train_inputs(cfg: TrainConfig) -> None:
    """The model's paths, the tokenizer folder and the training shards.
    (checkpoint.resume and zero.deepspeed_config are checked by TrainConfig.validate.)"""
    check_model_paths(cfg.model)
    if cfg.tokenizer.path is not None:
        require("tokenizer.path", cfg.tokenizer.path, TOKENIZER_FOLDER)
    check_shard_set("data.train_shards", cfg.data.train_shards, cfg.data.sizes_file)
