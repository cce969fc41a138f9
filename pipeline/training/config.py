"""Typed training configuration: a YAML recipe plus dotted `key=value` overrides.

`load_train_config("recipe.yaml", ["optim.lr=1e-4", "zero.stage=2"])` reads the
recipe, applies the overrides (values parsed as YAML, so `true`, `1e-4`,
`[0.9, 0.95]` and `null` work), builds the nested dataclasses and validates
every field and every combination before anything heavy starts: a typo or an
impossible combination fails in a second with the field named, not after the
model has been partitioned over 64 GPUs.

`model` takes a `preset` key (tiny | paper) whose values the other keys of the
section override; `data` is the data stream's own DataConfig. Every section goes
through the one typed loader (common.config_loading): each value is checked
against its field's annotation and errors are ConfigError naming the dotted field.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
from dataclasses import dataclass, field
from typing import Literal

from modeling.config import ModelConfig, ModelPreset
from common.config_loading import (  # noqa: F401 (parse_overrides: part of this module's API)
    ConfigError,
    apply_section,
    check_fields,
    coerce,
    deep_merge,
    parse_overrides,
    read_yaml_mapping,
)
from pipeline.training.config_sections import (  # noqa: F401
    CheckpointConfig,
    CpmCheckConfig,
    OptimConfig,
    OutputLockConfig,
    PerfConfig,
    PreemptionConfig,
    LoopConfig,
    TokenizerConfig,
    TrainConfigError,
    ZeroConfig,
)
from pipeline.data.config import DataConfig
from pipeline.training.batch import nearest_choices
from pipeline.tracking import WandbConfig


@dataclass
class TrainConfig:
    """One training run."""

    output_dir: str = "runs/train"
    """Everything of the run goes under this folder (checkpoints/, wandb/, tokenizer/, export/)."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig.preset("tiny"))
    """The model (a `preset` key in the recipe picks tiny or paper as the base)."""
    model_preset: ModelPreset | None = "tiny"
    """Preset the model section was built on (recorded for the run's config)."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer source."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data stream."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Length of training and step mechanics."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Training precision; CPU runs use fp32."""
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    """DeepSpeed ZeRO."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resume."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Tracking."""
    cpm_check: CpmCheckConfig = field(default_factory=CpmCheckConfig)
    """Start-up and per-step checks that the CPM finds its position."""
    perf: PerfConfig = field(default_factory=PerfConfig)
    """Peak FLOP/s of a device, for the model FLOPs utilisation (perf/mfu)."""
    output_lock: OutputLockConfig = field(default_factory=OutputLockConfig)
    """One run per output_dir (<output_dir>/run.lock)."""
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    """Stop on a signal, a vanished launcher or a STOP file, with a checkpoint (exit status 75)."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """On a non-finite loss: stop naming the step and batch keys, or skip the micro-batch."""
    distributed_timeout_s: float = 1800.0
    """Seconds a collective (all-reduce, barrier, broadcast) may wait for the other
    ranks before the process group fails the job. It bounds how long a rank that
    hangs alive (stopped, stuck I/O) blocks the others; a dead rank is noticed at
    once regardless. It must exceed the longest time one rank works alone while the
    others wait in a barrier: building the tokenizer, a checkpoint save, and the
    final export (rank 0 writes the merged model)."""

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.output_dir, "checkpoints")

    @property
    def wandb_dir(self) -> str:
        return self.wandb.dir or self.output_dir

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        d["data"] = self.data.to_dict()
        return d

    def validate(self) -> "TrainConfig":
        """Every field's type (all sections), each section's own checks, then the
        training ranges and the combinations across sections."""
        check_fields(self, "")
        self.model.validate()
        self.data.validate()
        _check_train(self)
        return self


# --------------------------------------------------------------------------- loading

# Fields that were renamed: an old recipe fails with the new name instead of "unknown field".
RENAMED_FIELDS = {
    "schedule": "loop",
    "optim.schedule": "optim.lr_schedule",
}


# The recipes ship inside the package (package data), so an installed package
# can train with `--config tiny-cpu` without a checkout.
RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


def packaged_recipes() -> list[str]:
    """Names of the recipes shipped with the package (`tiny-cpu`, `fakereasoning-13b`)."""
    return sorted(n[: -len(".yaml")] for n in os.listdir(RECIPES_DIR) if n.endswith(".yaml"))


def recipe_path(recipe: str) -> str:
    """A recipe file: `recipe` itself when it is a path that exists, else the
    packaged recipe of that name (with or without .yaml). A name that is neither
    is an error listing the packaged recipes."""
    if os.path.exists(recipe):
        return recipe
    name = recipe[: -len(".yaml")] if recipe.endswith(".yaml") else recipe
    if os.sep not in name and name in packaged_recipes():
        return os.path.join(RECIPES_DIR, name + ".yaml")
    raise ConfigError(f"recipe {recipe} does not exist (not a file, and not one of the packaged recipes "
                      f"{', '.join(packaged_recipes())})")


def load_train_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """Recipe YAML (a path or a packaged recipe's name; None: defaults) +
    overrides -> validated TrainConfig."""
    path = recipe_path(path) if path is not None else None
    raw = read_yaml_mapping(path) if path is not None else {}
    raw = deep_merge(raw, parse_overrides(overrides or []))
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{e}") from None


def config_from_dict(raw: dict) -> TrainConfig:
    """A validated TrainConfig from the nested dict of a recipe (overrides merged in)."""
    raw = dict(raw)
    if "model_preset" in raw:
        raise ConfigError("model_preset is derived; set model.preset instead")
    model, preset = _model_section(raw.pop("model", None))
    cfg = apply_section(TrainConfig(model=model, model_preset=preset), raw, "", RENAMED_FIELDS)
    return cfg.validate()


def _model_section(section) -> tuple[ModelConfig, str | None]:
    """The model section: its `preset` key (default tiny; null: the dataclass
    defaults) picks the base that the section's other keys override."""
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"model={section!r}: must be a mapping of ModelConfig fields (and preset)")
    section = dict(section)
    preset = coerce(section.pop("preset", "tiny"), ModelPreset | None, "model.preset")
    base = ModelConfig.preset(preset) if preset is not None else ModelConfig()
    return ModelConfig.from_dict(section, base=base), preset


def _check_train(c: TrainConfig) -> None:
    """The training ranges, section by section, then the combinations across
    sections; the first bad field raises ConfigError naming it."""
    if not c.output_dir:
        _bad("output_dir", "must not be empty")
    _check_optim(c.optim)
    _check_loop(c.loop, c.data.batch_size)
    _check_zero(c.zero)
    _check_checkpoint(c.checkpoint)
    if c.output_lock.refresh_s <= 0 or c.output_lock.stale_after_s <= 2 * c.output_lock.refresh_s:
        _bad("output_lock.stale_after_s", f"must exceed 2 x output_lock.refresh_s (> 0); got "
             f"{c.output_lock.stale_after_s} and {c.output_lock.refresh_s}")
    _check_preemption(c.preemption)
    _check_limits(c)
    _check_combinations(c)


def _bad(name: str, why: str) -> None:
    """Raise the ConfigError for the dotted field `name`."""
    raise ConfigError(f"{name}: {why}")


def _check_optim(o: OptimConfig) -> None:
    """optim: learning rates, AdamW's settings and the schedule's shape."""
    if o.lr <= 0:
        _bad("optim.lr", f"must be > 0, got {o.lr}")
    if o.projector_lr is not None and o.projector_lr <= 0:
        _bad("optim.projector_lr", f"must be > 0 or null, got {o.projector_lr}")
    if o.weight_decay < 0:
        _bad("optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    if not all(0.0 <= b < 1.0 for b in o.betas):
        _bad("optim.betas", f"each must be in [0, 1), got {list(o.betas)}")
    if o.eps <= 0:
        _bad("optim.eps", f"must be > 0, got {o.eps}")
    if not 0.0 <= o.warmup_ratio < 1.0:
        _bad("optim.warmup_ratio", f"must be in [0, 1), got {o.warmup_ratio}")
    if o.warmup_steps is not None and o.warmup_steps < 0:
        _bad("optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        _bad("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")


def _check_loop(s: LoopConfig, batch_size: int) -> None:
    """loop: the run's length, the global batch (against data.batch_size), clipping and logging."""
    if s.max_steps is None and s.epochs is None:
        _bad("loop.max_steps", "set max_steps or loop.epochs (both are null)")
    if s.max_steps is not None and s.max_steps < 1:
        _bad("loop.max_steps", f"must be >= 1, got {s.max_steps}")
    if s.max_steps is None and s.epochs is not None and s.epochs <= 0:
        _bad("loop.epochs", f"must be > 0, got {s.epochs}")
    if s.stop_at_step is not None and s.stop_at_step < 1:
        _bad("loop.stop_at_step", f"must be >= 1 or null, got {s.stop_at_step}")
    if s.grad_accum is not None and s.grad_accum < 1:
        _bad("loop.grad_accum", f"must be >= 1 or null, got {s.grad_accum}")
    if s.global_batch is not None:
        if s.global_batch < 1:
            _bad("loop.global_batch", f"must be >= 1 or null, got {s.global_batch}")
        if s.global_batch % batch_size:
            # No world size can help: the ranks' micro-batches must add up to it.
            near = nearest_choices(s.global_batch, batch_size, 1)
            _bad("loop.global_batch", f"{s.global_batch} is not a multiple of data.batch_size="
                 f"{batch_size} (on any number of ranks); nearest valid: loop.global_batch="
                 f"{' or '.join(map(str, near['loop.global_batch']))}, or data.batch_size="
                 f"{' or '.join(map(str, near.get('data.batch_size', [])))}")
    if s.grad_clip < 0:
        _bad("loop.grad_clip", f"must be >= 0 (0 disables), got {s.grad_clip}")
    if s.log_every < 1:
        _bad("loop.log_every", f"must be >= 1, got {s.log_every}")


def _check_zero(z: ZeroConfig) -> None:
    """zero: offloads the stage allows, the DeepSpeed JSON's path, bucket sizes."""
    if z.offload_param != "none" and z.stage != 3:
        _bad("zero.offload_param", f"needs zero.stage=3 (got stage {z.stage})")
    if z.offload_optimizer != "none" and z.stage == 0:
        _bad("zero.offload_optimizer", "needs zero.stage >= 1")
    if z.deepspeed_config is not None and not os.path.isfile(z.deepspeed_config):
        _bad("zero.deepspeed_config", f"{z.deepspeed_config} does not exist")
    for n in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if getattr(z, n) < 0:
            _bad(f"zero.{n}", "must be >= 0")


def _check_checkpoint(k: CheckpointConfig) -> None:
    """checkpoint: how often, how many are kept, what to resume from."""
    if k.every_steps < 0:
        _bad("checkpoint.every_steps", f"must be >= 0, got {k.every_steps}")
    if k.keep_last < 1:
        _bad("checkpoint.keep_last", f"must be >= 1, got {k.keep_last}")
    if k.resume not in (None, "auto") and not os.path.isdir(k.resume):
        _bad("checkpoint.resume", f"must be 'auto', null or an existing checkpoint folder; {k.resume} is none")


def _check_preemption(p: PreemptionConfig) -> None:
    """preemption: catchable signals of Python's signal module, the grace and poll times."""
    unknown = [n for n in p.signals if n not in signal.Signals.__members__]
    if unknown or (p.enabled and not p.signals):
        _bad("preemption.signals", f"must name signals of Python's signal module (e.g. SIGTERM, SIGUSR1); "
             f"got {list(p.signals)}" + (f" ({unknown} unknown)" if unknown else ""))
    if "SIGKILL" in p.signals or "SIGSTOP" in p.signals:
        _bad("preemption.signals", "SIGKILL and SIGSTOP cannot be caught")
    if not (p.grace_s >= 0 and math.isfinite(p.grace_s)):
        _bad("preemption.grace_s", f"must be a finite number of seconds >= 0 (0: no limit), got {p.grace_s}")
    if not (p.poll_s > 0 and math.isfinite(p.poll_s)):
        _bad("preemption.poll_s", f"must be a finite number of seconds > 0, got {p.poll_s}")


def _check_limits(c: TrainConfig) -> None:
    """The other margins, timeouts and counts: free space, collectives, CPM checks,
    peak FLOP/s, W&B, the built tokenizer's vocabulary."""
    if c.checkpoint.space_margin < 0:
        _bad("checkpoint.space_margin",
             f"must be >= 0 (0 disables the free-space checks), got {c.checkpoint.space_margin}")
    if not (c.distributed_timeout_s > 0 and math.isfinite(c.distributed_timeout_s)):
        _bad("distributed_timeout_s", f"must be a finite number of seconds > 0, got {c.distributed_timeout_s}")
    if c.cpm_check.prefix_samples < 1:
        _bad("cpm_check.prefix_samples", f"must be >= 1, got {c.cpm_check.prefix_samples}")
    if c.cpm_check.abort_after_steps < 0:
        _bad("cpm_check.abort_after_steps", f"must be >= 0 (0 disables), got {c.cpm_check.abort_after_steps}")
    if c.perf.peak_tflops is not None and not (c.perf.peak_tflops > 0 and math.isfinite(c.perf.peak_tflops)):
        _bad("perf.peak_tflops", f"must be a finite number of TFLOP/s > 0 or null, got {c.perf.peak_tflops}")
    if c.wandb.init_timeout <= 0:
        _bad("wandb.init_timeout", f"must be > 0, got {c.wandb.init_timeout}")
    if c.tokenizer.path is None and c.tokenizer.vocab_size < 300:
        _bad("tokenizer.vocab_size", f"must be >= 300 for a built tokenizer, got {c.tokenizer.vocab_size}")


def _check_combinations(c: TrainConfig) -> None:
    """Across sections: the precision against model.dtype, the longest sequence against the LLM's positions."""
    if c.precision == "fp32" and c.model.dtype != "float32":
        _bad("precision", f"fp32 training needs model.dtype=float32, got {c.model.dtype}")
    if c.precision == "bf16" and c.model.dtype == "float16":
        _bad("precision", "bf16 training with model.dtype=float16; use bfloat16 or float32")
    if c.precision == "fp16" and c.model.dtype == "bfloat16":
        _bad("precision", "fp16 training with model.dtype=bfloat16; use float16 or float32")
    # The one <image> placeholder becomes num_image_tokens positions in the LLM.
    longest = c.data.max_length - 1 + c.model.num_image_tokens
    if longest > c.model.llm.max_position_embeddings:
        _bad("data.max_length", f"{c.data.max_length} tokens + {c.model.num_image_tokens - 1} extra image "
             f"positions exceed model.llm.max_position_embeddings={c.model.llm.max_position_embeddings}")
