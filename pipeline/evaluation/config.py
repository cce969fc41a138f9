"""Typed configuration of an evaluation run (`launch/eval.py` fills it from its flags)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.config import WandbConfig


class EvalConfigError(ValueError):
    """A bad evaluation setting; the message names the field."""


@dataclass
class EvalConfig:
    """Everything an evaluation run depends on (recorded in results.json)."""

    checkpoint: str = ""
    """Model directory: this project's merged export or trainable checkpoint, or
    the reference's released format (config.json with model_type llava_llama)."""
    out: str = ""
    """Results folder: results.json, results.md, predictions.jsonl, plots."""
    shards: str | None = None
    """MMFR evaluation shards: OUT_DIR/eval of the sharder (one sub-folder per generator)."""
    set_name: str = "mmfr"
    """Name of the `shards` set in the reports."""
    benchmarks: dict[str, str] = field(default_factory=dict)
    """Cross-dataset benchmark shard folders, name -> OUT of `sharding.benchmarks`."""
    batch_size: int = 8
    """Images per generation batch on each rank."""
    max_new_tokens: int = 512
    """Generation length limit; an answer cut here usually has no conclusion (unparseable)."""
    temperature: float = 0.0
    """0 = greedy decoding (default, deterministic); > 0 samples with this temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (only with temperature > 0)."""
    seed: int = 0
    """Seed of sampling (each rank adds its rank)."""
    css_model: str | None = None
    """Local CLIP directory (transformers CLIPModel or CLIPTextModelWithProjection + tokenizer)
    for CSS; None: CSS is reported as n/a."""
    css_batch_size: int = 64
    """Texts per CLIP text model batch."""
    num_workers: int = 2
    """Image decoding worker processes per rank."""
    limit: int | None = None
    """Score only the first N images of each set (smoke tests); expected counts follow."""
    dtype: str | None = None
    """Override the model's dtype (float32, bfloat16, float16); None keeps the checkpoint's."""
    reference_base_model: str | None = None
    """For a reference LoRA training output: the model it was trained from."""
    plots: bool = True
    """Write the PNG plots."""
    wandb: WandbConfig = field(default_factory=lambda: WandbConfig(mode="disabled"))
    """W&B tracking on rank 0 (tables + a sample of predictions with images)."""
    wandb_samples: int = 32
    """Predictions (with their images) sent to W&B."""
    progress: bool = True
    """Show a tqdm bar on rank 0."""

    def sets(self) -> dict[str, str]:
        """Set name -> shard folder, MMFR first then the benchmarks in the order given."""
        out = {}
        if self.shards:
            out[self.set_name] = self.shards
        for name, path in self.benchmarks.items():
            if name in out:
                raise EvalConfigError(f"benchmarks: set name {name!r} is used twice")
            out[name] = path
        return out

    def validate(self) -> "EvalConfig":
        if not self.checkpoint:
            raise EvalConfigError("checkpoint: required (a model directory)")
        if not os.path.isdir(self.checkpoint):
            raise EvalConfigError(f"checkpoint: {self.checkpoint!r} is not a directory")
        if not self.out:
            raise EvalConfigError("out: required (the results folder)")
        if not self.sets():
            raise EvalConfigError("shards / benchmarks: give at least one set to evaluate")
        for name, path in self.sets().items():
            if not os.path.isdir(path):
                raise EvalConfigError(f"shards of set {name!r}: {path!r} is not a directory")
        for name in ("batch_size", "max_new_tokens", "css_batch_size"):
            if getattr(self, name) < 1:
                raise EvalConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise EvalConfigError(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.limit is not None and self.limit < 1:
            raise EvalConfigError(f"limit: must be >= 1 or None, got {self.limit}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise EvalConfigError(f"temperature must be >= 0 and top_p in (0, 1]; got {self.temperature}, {self.top_p}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise EvalConfigError(f"dtype: {self.dtype!r} is not float32, bfloat16 or float16")
        if self.css_model is not None and not os.path.isdir(self.css_model):
            raise EvalConfigError(f"css_model: {self.css_model!r} is not a directory")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
