"""Typed configuration of an evaluation run (`launch/eval.py` fills it from its flags)."""
from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from modeling.config import Dtype
from common.config_loading import ConfigError, check_fields, load_section
from modeling.image_processing import ImageLimits
from pipeline.evaluation.input_checks import check_eval_inputs
from pipeline.tracking import WandbConfig

if TYPE_CHECKING:
    from pipeline.evaluation.perturbations import Perturbation


# The old name of the one configuration error class (common.config_loading).
EvalConfigError = ConfigError


# Evaluation protocols. "ours": Vicuna v1 prompt (as in training), greedy
# decoding, the strict-with-loose-fallback parser. "reference": what the
# reference's forgery_eval/eval.py does: LLaVA's llava_v1 conversation,
# sampling at temperature 0.2 without nucleus filtering, one beam, 512 new
# tokens, its substring parser, only images listed in the MMFR reasoning
# JSONs, and CSS of an empty hypothesis from CLIP's embedding of "".
Protocol = Literal["ours", "reference"]
PROTOCOLS: tuple[str, ...] = typing.get_args(Protocol)
# The names of modeling.template.CONVERSATIONS (a test keeps the two equal).
Conversation = Literal["vicuna_v1", "llava_v1"]
# The generation settings each protocol fixes (None top_p = no nucleus filtering).
PROTOCOL_GENERATION: dict[str, dict[str, Any]] = {
    "ours": {"conversation": "vicuna_v1", "temperature": 0.0, "top_p": None, "num_beams": 1, "max_new_tokens": 512},
    "reference": {"conversation": "llava_v1", "temperature": 0.2, "top_p": None, "num_beams": 1,
                  "max_new_tokens": 512},
}


GENERATION_FIELDS: tuple[str, ...] = ("conversation", "temperature", "top_p", "max_new_tokens")


def effective_generation(settings: Any) -> dict[str, Any]:
    """The generation settings a run uses: its protocol's (PROTOCOL_GENERATION),
    with each of GENERATION_FIELDS that `settings` sets (not None) instead. Shared
    by EvalConfig and the prediction command's PredictConfig, so the same flags
    give the same answers in both."""
    out = dict(PROTOCOL_GENERATION[settings.protocol])
    for name in GENERATION_FIELDS:
        if getattr(settings, name) is not None:
            out[name] = getattr(settings, name)
    return out


def check_generation_fields(settings: Any) -> None:
    """ConfigError for a bad value of the shared generation fields."""
    if settings.batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1, got {settings.batch_size}")
    if settings.num_workers < 0:
        raise ConfigError(f"num_workers: must be >= 0, got {settings.num_workers}")
    if settings.max_new_tokens is not None and settings.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: must be >= 1 or None, got {settings.max_new_tokens}")
    if settings.temperature is not None and settings.temperature < 0:
        raise ConfigError(f"temperature: must be >= 0, got {settings.temperature}")
    if settings.top_p is not None and not 0 < settings.top_p <= 1:
        raise ConfigError(f"top_p: must be in (0, 1] or None, got {settings.top_p}")


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
    protocol: Protocol = "ours"
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
    conversation: Conversation | None = None
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
    dtype: Dtype | None = None
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
    perturb: list[str] = field(default_factory=list)
    """Robustness sweep: perturbation specs KIND:S1[,S2...] with KIND jpeg (quality 1..100),
    resize (down-scale factor in (0, 1]) or blur (Gaussian radius > 0), e.g. ["jpeg:95,75,50",
    "resize:0.5"]; each image is also scored under each (pipeline/evaluation/perturbations.py)."""
    calibrate_on: str | None = None
    """Name of a set (one of sets()) on which the p_fake threshold maximising accuracy is chosen;
    every set then also reports its CPM accuracy at it (pipeline/evaluation/calibration.py)."""
    face_crop: bool = False
    """Crop video frames to their largest face (OpenCV Haar cascade, extra 'face') before
    perturbations and preprocessing (pipeline/evaluation/video.py)."""
    max_image_side: int = ImageLimits.max_side
    """Longest side in pixels an image may declare; checked before it is decoded or
    padded, a larger one is a failure record naming the bound (the sharder's --max-side)."""
    max_image_aspect_ratio: float = ImageLimits.max_aspect_ratio
    """Largest longer-side / shorter-side ratio of an image, checked likewise (the
    sharder's --max-aspect-ratio)."""
    restart: bool = False
    """Delete the partial output of an earlier run (`out`/partial, pipeline/evaluation/resume.py)
    and score everything again; without it a rerun resumes, or refuses when its settings differ."""

    def sets(self) -> dict[str, str]:
        """Set name -> shard folder, MMFR first then the benchmarks in the order given."""
        out = {}
        if self.shards:
            out[self.set_name] = self.shards
        for name, path in self.benchmarks.items():
            if name in out:
                raise ConfigError(f"benchmarks: set name {name!r} is used twice")
            out[name] = path
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EvalConfig":
        """Build from a plain (possibly partial) dict through the typed loader and validate."""
        return load_section(cls, values, "").validate()

    def validate(self) -> "EvalConfig":
        """Types (common.config_loading), values, then every input path
        (pipeline.evaluation.input_checks); raise ConfigError naming the field."""
        check_fields(self, "")
        if not self.checkpoint:
            raise ConfigError("checkpoint: required (a model directory)")
        if not self.out:
            raise ConfigError("out: required (the results folder)")
        if not self.sets():
            raise ConfigError("shards / benchmarks: give at least one set to evaluate")
        check_generation_fields(self)
        if self.css_batch_size < 1:
            raise ConfigError(f"css_batch_size: must be >= 1, got {self.css_batch_size}")
        for name in ("limit", "max_per_class"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be >= 1 or None, got {value}")
        if self.max_image_side < 1:
            raise ConfigError(f"max_image_side: must be >= 1, got {self.max_image_side}")
        if not self.max_image_aspect_ratio >= 1:
            raise ConfigError(f"max_image_aspect_ratio: must be >= 1, got {self.max_image_aspect_ratio}")
        self.perturbations()
        if self.face_crop:
            from pipeline.evaluation.video import FaceCropper

            try:
                FaceCropper()  # fail here, not as one failure record per frame in the workers
            except (ImportError, FileNotFoundError) as exc:
                raise ConfigError(f"face_crop: {exc}") from None
        if self.calibrate_on is not None and self.calibrate_on not in self.sets():
            raise ConfigError(f"calibrate_on: {self.calibrate_on!r} is not one of the sets "
                                  f"({', '.join(self.sets())})")
        check_eval_inputs(self)
        return self

    def perturbations(self) -> list[Perturbation]:
        """The sweep's perturbations.Perturbation list, in the order given."""
        from pipeline.evaluation.perturbations import PerturbationError, parse_perturbations

        try:
            return parse_perturbations(self.perturb)
        except PerturbationError as exc:
            raise ConfigError(f"perturb: {exc}") from None

    def image_limits(self) -> ImageLimits:
        """max_image_side and max_image_aspect_ratio as the loader takes them."""
        return ImageLimits(self.max_image_side, self.max_image_aspect_ratio)

    def generation(self) -> dict[str, Any]:
        """Effective generation settings: the protocol's, with any field set here instead."""
        return effective_generation(self)

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
