"""Typed configuration of a prediction run (`fakereasoning-predict` fills it from its flags).

The protocol and generation fields are the evaluation's (EvalConfig), with the
same names, defaults and checks (`effective_generation`, `check_generation_fields`),
so the same flags give the same answers in `fakereasoning-eval` and here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from modeling.config import Dtype
from common.config_loading import ConfigError, check_fields
from pipeline.evaluation.config import (
    PROTOCOL_GENERATION,
    Conversation,
    Protocol,
    check_generation_fields,
    effective_generation,
)

OutputFormat = Literal["text", "jsonl", "csv"]
Quantize = Literal["8bit", "4bit"]


@dataclass
class PredictConfig:
    """Everything a prediction run depends on (the settings part goes into each record's key)."""

    checkpoint: str = ""
    """Model directory: anything `fakereasoning-eval --checkpoint` accepts (this project's
    merged export or training checkpoint, or the reference's released `llava_llama` folder)."""
    inputs: list[str] = field(default_factory=list)
    """Image or video files, folders (searched recursively), glob patterns, or "-" for
    paths on standard input, one per line."""
    list_file: str | None = None
    """A text file of paths, one per line (blank lines and lines starting with # skipped)."""
    out: str | None = None
    """Output file; None: standard output. A rerun with the same file resumes."""
    format: OutputFormat | None = None
    """text (a readable block per image), jsonl or csv; None: from `out`'s extension
    (.csv csv, .txt text, else jsonl), and text on standard output."""
    threshold: float = 0.5
    """The verdict is fake when p(fake) >= threshold."""
    protocol: Protocol = "ours"
    """Evaluation protocol (prompt conversation, decoding, parser), as in fakereasoning-eval."""
    batch_size: int = 8
    """Images per forward on each rank."""
    max_new_tokens: int | None = None
    """Answer length limit (None: the protocol's, 512)."""
    temperature: float | None = None
    """None: the protocol's (ours 0 = greedy, reference 0.2); > 0 samples."""
    top_p: float | None = None
    """Nucleus sampling threshold; None: the protocol's (no filtering)."""
    conversation: Conversation | None = None
    """Prompt conversation; None: the protocol's (ours vicuna_v1, reference llava_v1)."""
    seed: int = 0
    """Sampling seed; each batch is seeded from it and the content hash of its first image."""
    dtype: Dtype | None = None
    """Override the checkpoint's dtype (e.g. bfloat16 on a GPU)."""
    num_workers: int = 2
    """Image decoding worker processes per rank (0: decode in the main process)."""
    reference_base_model: str | None = None
    """For a reference LoRA training output: the model folder it was trained from."""
    detect_only: bool = False
    """No reasoning: one forward with the conclusion prefix forced right after the
    prompt gives p(fake). Out of the training distribution (see the README's figures)."""
    evidence: str | None = None
    """Folder receiving, per image, the DINOv2 attention the fusion module consumed as a
    heat map over the image (PNG) and the raw grid (.npy); top regions go into the record."""
    evidence_top: int = 5
    """Grid cells listed in each record's `evidence.top_regions`."""
    quantize: Quantize | None = None
    """Load the LLM's linear layers in 8 or 4 bits (bitsandbytes; the 'quantize' extra)."""
    video_fps: float = 1.0
    """Video frames sampled per second (the video benchmarks' sharder default)."""
    video_max_frames: int = 16
    """At most this many frames per video (the video benchmarks' sharder default)."""
    max_pixels: int = 89_478_485
    """Images with more pixels (width x height) are refused before decoding (PIL's own
    decompression-bomb limit)."""
    max_file_bytes: int = 1 << 30
    """Files larger than this are refused before reading (1 GiB)."""
    max_image_side: int = 16384
    """Longest side in pixels; a larger image is refused before decoding (the eval's bound,
    modeling.image_processing.ImageLimits)."""
    max_image_aspect_ratio: float = 20.0
    """Longer over shorter side; a larger ratio is refused before decoding (a 1 KB PNG can
    declare 1,000,000 x 1 pixels)."""
    progress: bool = True
    """Show a tqdm bar on standard error (rank 0)."""
    restart: bool = False
    """Ignore records already in `out` and predict every input again (the file is replaced)."""

    def generation(self) -> dict[str, Any]:
        """Effective generation settings: the protocol's, with any field set here instead."""
        return effective_generation(self)

    def output_format(self) -> str:
        if self.format is not None:
            return self.format
        if self.out is None:
            return "text"
        suffix = Path(self.out).suffix.lower()
        return {".csv": "csv", ".txt": "text"}.get(suffix, "jsonl")

    def validate(self, require_inputs: bool = True) -> "PredictConfig":
        """Types, values and paths; a ConfigError names the field. require_inputs False:
        inputs come later, one by one (the web demo)."""
        from pipeline.input_paths import CHECKPOINT_FOLDER
        from modeling.checkpoints.input_paths import require, require_model_folder

        check_fields(self, "")
        if not self.checkpoint:
            raise ConfigError("checkpoint: required (a model directory)")
        if require_inputs and not self.inputs and self.list_file is None:
            raise ConfigError("inputs: give at least one file, folder, glob, '-' (stdin) or --list FILE")
        check_generation_fields(self)
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold: must be in [0, 1], got {self.threshold}")
        for name in ("evidence_top", "video_max_frames", "max_pixels", "max_file_bytes", "max_image_side"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.max_image_aspect_ratio >= 1:
            raise ConfigError(f"max_image_aspect_ratio: must be >= 1, got {self.max_image_aspect_ratio}")
        if self.video_fps <= 0:
            raise ConfigError(f"video_fps: must be > 0, got {self.video_fps}")
        if self.detect_only and any(
                getattr(self, n) is not None for n in ("temperature", "top_p", "max_new_tokens")):
            raise ConfigError("detect_only: generates no answer, so temperature / top_p / max_new_tokens "
                              "have no effect; drop them")
        if self.inputs.count("-") > 1:
            raise ConfigError("inputs: '-' (standard input) can be given once")
        if self.out is not None and self.output_format() == "text" and not self.restart and Path(self.out).exists():
            raise ConfigError(f"out={self.out!r}: the text format cannot be resumed; use jsonl or csv, "
                              "another file, or --restart to replace it")
        if self.list_file is not None and not Path(self.list_file).is_file():
            raise ConfigError(f"list_file={self.list_file!r}: not a file")
        require("checkpoint", self.checkpoint, CHECKPOINT_FOLDER)
        if self.reference_base_model is not None:
            require_model_folder("reference_base_model", self.reference_base_model)
        if self.quantize is not None:
            from modeling.checkpoints.quantization import QuantizationError, import_bitsandbytes

            try:
                import_bitsandbytes()
            except QuantizationError as exc:
                raise ConfigError(str(exc)) from None
        return self

    def image_limits(self):
        """max_image_side and max_image_aspect_ratio as the loader takes them."""
        from modeling.image_processing import ImageLimits

        return ImageLimits(self.max_image_side, self.max_image_aspect_ratio)

    def settings_record(self) -> dict[str, Any]:
        """What changes a prediction (the resume key's settings part)."""
        return {"protocol": self.protocol, "generation": self.generation(), "seed": self.seed,
                "threshold": self.threshold, "mode": "detect_only" if self.detect_only else "full",
                "dtype": self.dtype, "quantize": self.quantize, "evidence": self.evidence is not None,
                "video_fps": self.video_fps, "video_max_frames": self.video_max_frames}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["PredictConfig", "PROTOCOL_GENERATION", "OutputFormat"]
