"""Typed training configuration: a YAML recipe plus dotted `key=value` overrides.

`load_train_config("recipe.yaml", ["optim.lr=1e-4", "zero.stage=2"])` reads the
recipe, applies the overrides (values parsed as YAML, so `true`, `1e-4`,
`[0.9, 0.95]` and `null` work), builds the nested dataclasses and validates
every field and every combination before anything heavy starts: a typo or an
impossible combination fails in a second with the field named, not after the
model has been partitioned over 64 GPUs.

`model` takes a `preset` key (tiny | paper) whose values the other keys of the
section override; `data` is the data stream's own DataConfig.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from modeling.config import ModelConfig
from modeling.flops import PEAK_TFLOPS
from pipeline.data.config import DataConfig


class TrainConfigError(ValueError):
    """A recipe or override is invalid; the message names the field."""


@dataclass
class TokenizerConfig:
    """Where the tokenizer comes from."""

    path: str | None = None
    """A transformers tokenizer directory (the LLM's own for the paper recipe).
    None builds a small byte-level BPE tokenizer from the conversations of the
    training shards (tiny preset), saved under `<output_dir>/tokenizer`."""
    vocab_size: int = 1024
    """Vocabulary bound of the built tokenizer (ignored when `path` is set)."""
    corpus_samples: int = 2000
    """Training samples read from the shards to build the tokenizer."""


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 2e-5
    """Peak learning rate of the LLM's LoRA adapters (and of everything that is
    not a projector)."""
    projector_lr: float | None = None
    """Peak learning rate of the two projectors and the fusion module; None
    uses `lr` (the paper uses the same 2e-5)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to biases and norms)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.03
    """Share of the total optimizer steps spent in linear warm-up from 0."""
    warmup_steps: int | None = None
    """Warm-up length in steps; overrides warmup_ratio when set."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Decay after warm-up: cosine down to min_lr_ratio x lr, or constant."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine decay as a fraction of the peak learning rate."""


@dataclass
class ScheduleConfig:
    """How long to train and how a step is made. The micro-batch size per rank
    is `data.batch_size` (the loader owns it)."""

    epochs: float | None = 3.0
    """Passes over the training shards (fractions allowed); ignored when max_steps is set."""
    max_steps: int | None = None
    """Optimizer steps to run; when set it decides the length (and the cosine horizon)."""
    stop_at_step: int | None = None
    """End this run (with a checkpoint, without the export) once global_step
    reaches this, keeping the schedule's horizon: a time slice of a longer job
    on a preemptible queue, continued later with checkpoint.resume=auto."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold; 0 disables clipping."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (LLM layers) to save memory."""
    log_every: int = 1
    """Log metrics every this many optimizer steps."""
    seed: int = 42
    """Seed of model initialisation and of per-step dropout (resume-invariant)."""


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO settings (the generated DeepSpeed JSON)."""

    stage: int = 3
    """ZeRO stage 0-3: 3 partitions parameters, gradients and optimizer states."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep optimizer states (and the step) on the CPU."""
    offload_param: Literal["none", "cpu"] = "none"
    """Keep partitioned parameters on the CPU (stage 3 only)."""
    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient reduce bucket."""
    stage3_prefetch_bucket_size: int = 50_000_000
    """Elements of parameters prefetched ahead of use (stage 3)."""
    stage3_param_persistence_threshold: int = 100_000
    """Parameters smaller than this many elements stay unpartitioned (stage 3);
    set 0 to partition everything."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON of your own, used instead of the generated one (batch
    sizes, clipping and precision are still checked against this config)."""


@dataclass
class CheckpointConfig:
    """Checkpoints, resume and the final export."""

    dir: str | None = None
    """Checkpoint folder; None: `<output_dir>/checkpoints`."""
    every_steps: int = 500
    """Save every this many optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """Complete checkpoints kept (older ones are deleted after a newer one completes)."""
    resume: str | None = None
    """"auto": continue from the newest complete checkpoint in `dir` if there
    is one; a path: that checkpoint tag folder; None: start fresh."""
    save_final: bool = True
    """Save a DeepSpeed checkpoint after the last step."""
    export: bool = True
    """After the last step write the LoRA adapter + trainables and the merged model."""


@dataclass
class WandbConfig:
    """Weights & Biases tracking (global rank 0 only)."""

    project: str = "fakereasoning"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); None: the account default."""
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto: online when credentials exist and the server answers, else offline."""
    name: str | None = None
    """Run name; None lets W&B choose."""
    dir: str | None = None
    """Folder that receives `wandb/`; None: the output folder."""
    group: str | None = None
    """Run group (e.g. a sweep or an ablation)."""
    tags: list[str] = field(default_factory=list)
    """Run tags."""
    init_timeout: float = 60.0
    """Seconds wandb.init may take before falling back to offline."""


@dataclass
class CpmCheckConfig:
    """Guards against a CPM that silently never fires (its loss would be zero)."""

    prefix_samples: int = 1000
    """Training answers read at start-up to resolve model.cpm.answer_prefix="auto"
    (their most common spelling of the conclusion) and to check an explicit one."""
    abort_after_steps: int = 10
    """Stop the run when its first this many optimizer steps found no CPM position
    in any sample, naming the conclusion text expected (0: never stop). Every
    step without one is also logged as a warning with the batch's sample keys."""


@dataclass
class PerfConfig:
    """Model FLOPs utilisation (perf/mfu): the peak one device could deliver.

    perf/mfu = model FLOPs of the step's real tokens (modeling.flops) /
    (step time x ranks x peak). Without a peak (CPU, an unknown GPU) perf/mfu is
    not logged; perf/model_tflops_per_s (achieved, per rank) always is."""

    peak_tflops: float | None = None
    """Dense peak TFLOP/s of one device in the training precision; null takes
    it from `gpu`. Set it for a GPU the table lacks or a precision it does not
    describe (the table is bf16/fp16 tensor cores; fp32 runs are lower)."""
    gpu: str = "auto"
    """Which entry of modeling.flops.PEAK_TFLOPS gives the peak when
    peak_tflops is null: "auto" matches torch.cuda.get_device_name() of the
    rank's device against the table (no CUDA device or no match: no perf/mfu,
    with a log line saying why), or a table key such as "H100" or "A100"."""


PRECISIONS = ("bf16", "fp16", "fp32")
NONFINITE_POLICIES = ("stop", "skip")


@dataclass
class TrainConfig:
    """One training run."""

    output_dir: str = "runs/train"
    """Everything of the run goes under this folder (checkpoints/, wandb/, tokenizer/, export/)."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig.preset("tiny"))
    """The model (a `preset` key in the recipe picks tiny or paper as the base)."""
    model_preset: str | None = "tiny"
    """Preset the model section was built on (recorded for the run's config)."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer source."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data stream."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
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
        _check_train(self)
        return self


# --------------------------------------------------------------------------- loading

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


def load_train_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """Recipe YAML (may be None: defaults) + overrides -> validated TrainConfig."""
    raw: dict = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise TrainConfigError(f"recipe {path} does not exist") from None
        except yaml.YAMLError as e:
            raise TrainConfigError(f"recipe {path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise TrainConfigError(f"recipe {path}: top level must be a mapping")
    raw = deep_merge(raw, parse_overrides(overrides or []))
    try:
        return config_from_dict(raw)
    except TrainConfigError as e:
        where = f"{path}: " if path else ""
        raise TrainConfigError(f"{where}{e}") from None


def config_from_dict(raw: dict) -> TrainConfig:
    raw = dict(raw)
    model_raw = dict(raw.pop("model", None) or {})
    data_raw = dict(raw.pop("data", None) or {})
    if "model_preset" in raw:
        raise TrainConfigError("model_preset is derived; set model.preset instead")
    preset = model_raw.pop("preset", "tiny")
    try:
        base = ModelConfig.preset(preset) if preset is not None else ModelConfig()
        model = ModelConfig.from_dict(model_raw, base=base)
    except ValueError as e:
        raise TrainConfigError(str(e) if "model" in str(e) else f"model: {e}") from None
    try:
        data = DataConfig.from_dict(data_raw)
    except (TypeError, ValueError) as e:
        raise TrainConfigError(str(e) if "data" in str(e) else f"data: {e}") from None
    cfg = _build(TrainConfig, raw, "", preset_fields={"model": model, "data": data})
    cfg.model_preset = preset
    return cfg.validate()


def _build(cls, data: dict, prefix: str, preset_fields: dict | None = None):
    if not isinstance(data, dict):
        raise TrainConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
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


def _check_train(c: TrainConfig) -> None:
    def bad(name: str, why: str) -> None:
        raise TrainConfigError(f"{name}: {why}")

    if not c.output_dir:
        bad("output_dir", "must not be empty")
    o = c.optim
    if o.lr <= 0:
        bad("optim.lr", f"must be > 0, got {o.lr}")
    if o.projector_lr is not None and o.projector_lr <= 0:
        bad("optim.projector_lr", f"must be > 0 or null, got {o.projector_lr}")
    if o.weight_decay < 0:
        bad("optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    if not all(0.0 <= b < 1.0 for b in o.betas):
        bad("optim.betas", f"each must be in [0, 1), got {list(o.betas)}")
    if o.eps <= 0:
        bad("optim.eps", f"must be > 0, got {o.eps}")
    if not 0.0 <= o.warmup_ratio < 1.0:
        bad("optim.warmup_ratio", f"must be in [0, 1), got {o.warmup_ratio}")
    if o.warmup_steps is not None and o.warmup_steps < 0:
        bad("optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        bad("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    s = c.schedule
    if s.max_steps is None and s.epochs is None:
        bad("schedule.max_steps", "set max_steps or schedule.epochs (both are null)")
    if s.max_steps is not None and s.max_steps < 1:
        bad("schedule.max_steps", f"must be >= 1, got {s.max_steps}")
    if s.max_steps is None and s.epochs is not None and s.epochs <= 0:
        bad("schedule.epochs", f"must be > 0, got {s.epochs}")
    if s.stop_at_step is not None and s.stop_at_step < 1:
        bad("schedule.stop_at_step", f"must be >= 1 or null, got {s.stop_at_step}")
    if s.grad_accum < 1:
        bad("schedule.grad_accum", f"must be >= 1, got {s.grad_accum}")
    if s.grad_clip < 0:
        bad("schedule.grad_clip", f"must be >= 0 (0 disables), got {s.grad_clip}")
    if s.log_every < 1:
        bad("schedule.log_every", f"must be >= 1, got {s.log_every}")
    z = c.zero
    if z.stage not in (0, 1, 2, 3):
        bad("zero.stage", f"must be 0, 1, 2 or 3, got {z.stage}")
    if z.offload_param != "none" and z.stage != 3:
        bad("zero.offload_param", f"needs zero.stage=3 (got stage {z.stage})")
    if z.offload_optimizer != "none" and z.stage == 0:
        bad("zero.offload_optimizer", "needs zero.stage >= 1")
    if z.deepspeed_config is not None and not os.path.isfile(z.deepspeed_config):
        bad("zero.deepspeed_config", f"{z.deepspeed_config} does not exist")
    for n in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if getattr(z, n) < 0:
            bad(f"zero.{n}", "must be >= 0")
    k = c.checkpoint
    if k.every_steps < 0:
        bad("checkpoint.every_steps", f"must be >= 0, got {k.every_steps}")
    if k.keep_last < 1:
        bad("checkpoint.keep_last", f"must be >= 1, got {k.keep_last}")
    if k.resume not in (None, "auto") and not os.path.isdir(k.resume):
        bad("checkpoint.resume", f"must be 'auto', null or an existing checkpoint folder; {k.resume} is none")
    if not (c.distributed_timeout_s > 0 and math.isfinite(c.distributed_timeout_s)):
        bad("distributed_timeout_s", f"must be a finite number of seconds > 0, got {c.distributed_timeout_s}")
    if c.cpm_check.prefix_samples < 1:
        bad("cpm_check.prefix_samples", f"must be >= 1, got {c.cpm_check.prefix_samples}")
    if c.cpm_check.abort_after_steps < 0:
        bad("cpm_check.abort_after_steps", f"must be >= 0 (0 disables), got {c.cpm_check.abort_after_steps}")
    if c.perf.peak_tflops is not None and not (c.perf.peak_tflops > 0 and math.isfinite(c.perf.peak_tflops)):
        bad("perf.peak_tflops", f"must be a finite number of TFLOP/s > 0 or null, got {c.perf.peak_tflops}")
    if c.perf.gpu != "auto" and c.perf.gpu not in PEAK_TFLOPS:
        bad("perf.gpu", f"{c.perf.gpu!r} is not 'auto' or a known GPU {sorted(PEAK_TFLOPS)} "
            f"(or set perf.peak_tflops)")
    if c.wandb.init_timeout <= 0:
        bad("wandb.init_timeout", f"must be > 0, got {c.wandb.init_timeout}")
    if c.tokenizer.path is None and c.tokenizer.vocab_size < 300:
        bad("tokenizer.vocab_size", f"must be >= 300 for a built tokenizer, got {c.tokenizer.vocab_size}")
    if c.tokenizer.path is not None and not os.path.isdir(c.tokenizer.path):
        bad("tokenizer.path", f"{c.tokenizer.path} is not a directory")
    # Cross-section combinations.
    if c.precision == "fp32" and c.model.dtype != "float32":
        bad("precision", f"fp32 training needs model.dtype=float32, got {c.model.dtype}")
    if c.precision == "bf16" and c.model.dtype == "float16":
        bad("precision", "bf16 training with model.dtype=float16; use bfloat16 or float32")
    if c.precision == "fp16" and c.model.dtype == "bfloat16":
        bad("precision", "fp16 training with model.dtype=bfloat16; use float16 or float32")
    # The one <image> placeholder becomes num_image_tokens positions in the LLM.
    longest = c.data.max_length - 1 + c.model.num_image_tokens
    if longest > c.model.llm.max_position_embeddings:
        bad("data.max_length", f"{c.data.max_length} tokens + {c.model.num_image_tokens - 1} extra image "
            f"positions exceed model.llm.max_position_embeddings={c.model.llm.max_position_embeddings}")
