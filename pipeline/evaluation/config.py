"""Typed configuration of an evaluation run (`launch/eval.py` fills it from its flags)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.tracking import WandbConfig


class EvalConfigError(ValueError):
    """A bad evaluation setting; the message names the field."""


# Evaluation protocols. "ours": Vicuna v1 prompt (as in training), greedy
# decoding, the strict-with-loose-fallback parser. "reference": what the
# reference's forgery_eval/eval.py does: LLaVA's llava_v1 conversation,
# sampling at temperature 0.2 without nucleus filtering, one beam, 512 new
# tokens, its substring parser, only images listed in the MMFR reasoning
# JSONs, and CSS of an empty hypothesis from CLIP's embedding of "".
PROTOCOLS: tuple[str, ...] = ("ours", "reference")
# The generation settings each protocol fixes (None top_p = no nucleus filtering).
PROTOCOL_GENERATION: dict[str, dict[str, Any]] = {
    "ours": {"conversation": "vicuna_v1", "temperature": 0.0, "top_p": None, "num_beams": 1, "max_new_tokens": 512},
    "reference": {"conversation": "llava_v1", "temperature": 0.2, "top_p": None, "num_beams": 1,
                  "max_new_tokens": 512},
}


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
    """Cross-dataset benchmark shard folders, name -> OUT of `sharding.eval_sets`."""
    protocol: str = "ours"
    """Evaluation protocol, one of PROTOCOLS: prompt, decoding, parser, selection and
    CSS of empty hypotheses (see PROTOCOL_GENERATION)."""
    batch_size: int = 8
    """Images per generation batch on each rank."""
    max_new_tokens: int | None = None
    """Generation length limit (None: the protocol's, 512); an answer cut here usually
    has no conclusion (unparseable)."""
    temperature: float | None = None
    """None: the protocol's (ours 0 = greedy, reference 0.2); 0 = greedy; > 0 samples."""
    top_p: float | None = None
    """Nucleus sampling threshold with temperature > 0; None: the protocol's (no filtering)."""
    conversation: str | None = None
    """Prompt conversation (modeling.template.CONVERSATIONS); None: the protocol's
    (ours vicuna_v1 as in training, reference llava_v1)."""
    seed: int = 0
    """Seed of sampling: each batch is seeded from it and its first image (runner.batch_seed)."""
    css_model: str | None = None
    """Local CLIP directory (transformers CLIPModel or CLIPTextModelWithProjection + tokenizer)
    for CSS; None: CSS is reported as n/a."""
    css_batch_size: int = 64
    """Texts per CLIP text model batch."""
    num_workers: int = 2
    """Image decoding worker processes per rank."""
    limit: int | None = None
    """Score only the first N (selected) images of each set in shard order (smoke tests,
    not balanced: the first generator's images); expected counts follow."""
    max_per_class: int | None = None
    """Per generator, the first N real and N fake images in reasoning-JSON order (the
    reference's max_sample, 10 in its script); None: every image."""
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
        for name in ("batch_size", "css_batch_size"):
            if getattr(self, name) < 1:
                raise EvalConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise EvalConfigError(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.protocol not in PROTOCOLS:
            raise EvalConfigError(f"protocol: {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        for name in ("limit", "max_per_class", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EvalConfigError(f"{name}: must be >= 1 or None, got {value}")
        if self.temperature is not None and self.temperature < 0:
            raise EvalConfigError(f"temperature: must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise EvalConfigError(f"top_p: must be in (0, 1] or None, got {self.top_p}")
        from modeling.template import CONVERSATIONS

        if self.conversation is not None and self.conversation not in CONVERSATIONS:
            raise EvalConfigError(f"conversation: {self.conversation!r} is not one of {', '.join(CONVERSATIONS)}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise EvalConfigError(f"dtype: {self.dtype!r} is not float32, bfloat16 or float16")
        if self.css_model is not None and not os.path.isdir(self.css_model):
            raise EvalConfigError(f"css_model: {self.css_model!r} is not a directory")
        return self

    def generation(self) -> dict[str, Any]:
        """Effective generation settings: the protocol's, with any field set here instead."""
        out = dict(PROTOCOL_GENERATION[self.protocol])
        for name in ("conversation", "temperature", "top_p", "max_new_tokens"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def reasoning_sets(self) -> tuple[str, ...]:
        """Sets restricted to images listed in their reasoning JSON: the MMFR set under
        the reference protocol (benchmarks have no such JSON and are taken whole)."""
        return (self.set_name,) if self.protocol == "reference" and self.shards else ()

    def protocol_record(self) -> dict[str, Any]:
        """What ran (results.json "protocol"): name, effective settings, and the
        settings that differ from the protocol's own."""
        gen = self.generation()
        own = PROTOCOL_GENERATION[self.protocol]
        return {
            "name": self.protocol, "generation": gen, "parser": self.protocol,
            "css_empty_hypothesis": "clip_embedding" if self.protocol == "reference" else "zero",
            "max_per_class": self.max_per_class, "limit": self.limit,
            "reasoning_json_only": list(self.reasoning_sets()), "seed": self.seed,
            "deviations": {k: v for k, v in gen.items() if v != own[k]},
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
