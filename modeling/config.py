"""Typed configuration of the FakeReasoning model, with the `tiny` and `paper` presets.

Everything that decides the shape of the model or where its weights come from
is a field here (model paths included: never environment variables), so that
a recipe fully describes a run. `validate()` names the offending field in every
error; runtime-only checks (flash-attn importable, CUDA present) are in
`check_runtime()`, called when the model is built, so that a config can still be
written and validated on a machine without a GPU.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DINO_BACKENDS = ("transformers", "timm")
CPM_POSITION_MODES = ("labels", "argmax")
DTYPES = ("float32", "bfloat16", "float16")
PROJECTOR_TYPES = ("mlp2x_gelu",)

# The conclusion's spelling in the real MMFR answers and in the reference's
# hard-coded CPM ids (910 = "▁This": a space after the tag).
DEFAULT_CPM_PREFIX = "<CONCLUSION> This image is"

# CLIP's normalisation constants (OpenAI CLIP); both towers see the same tensor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass
class VisionTowerConfig:
    """Fields shared by both frozen ViT towers."""

    path: str | None = None
    """Local checkpoint: a transformers model directory (CLIP, DINOv2 with the
    transformers backend) or the official DINOv2 `.pth` file (timm backend).
    None builds the tower from the fields below with random weights."""
    hidden_size: int = 1024
    """Token width of the tower (must match the checkpoint when `path` is set)."""
    num_layers: int = 24
    """Number of transformer blocks."""
    num_heads: int = 16
    """Attention heads per block."""
    intermediate_size: int = 4096
    """MLP hidden width of each block."""
    patch_size: int = 14
    """Side of a square patch in pixels; the model's image_size must be a multiple."""
    native_image_size: int = 336
    """Image size the position embeddings were trained at; other sizes are
    interpolated (DINOv2 ships 518, CLIP-336 ships 336)."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon of the blocks."""
    freeze: bool = True
    """Keep the tower frozen (no gradients, run under no_grad)."""
    attn_implementation: str = "sdpa"
    """Attention backend of the tower: sdpa, eager or flash_attention_2."""


@dataclass
class ClipTowerConfig(VisionTowerConfig):
    """CLIP vision tower (transformers CLIPVisionModel)."""

    select_layer: int = -2
    """Index into hidden_states whose patch tokens are used (-2: second to last layer)."""
    hidden_act: str = "quick_gelu"
    """Activation of the MLP (OpenAI CLIP uses quick_gelu)."""


@dataclass
class DinoTowerConfig(VisionTowerConfig):
    """DINOv2 tower: last block's pre-norm patch tokens and softmax attention map."""

    path: str | None = None
    """Local DINOv2 weights: the official `dinov2_vitl14_pretrain.pth` (the file
    the reference's README has users download; facebookresearch/dinov2 key
    layout, read with weights_only=True; a `.safetensors` with the same keys
    also works) with either `model.dino_backend`, or a transformers Dinov2Model
    directory with the transformers backend. Its position table is resampled to
    `model.image_size` with the official formula. None builds the tower from
    the fields below with random weights."""
    layer_norm_eps: float = 1e-6
    """LayerNorm epsilon of the blocks (DINOv2 uses 1e-6)."""
    layerscale_value: float = 1e-5
    """Initial LayerScale value (only used for random init)."""
    native_image_size: int = 518
    """Grid of a random-init tower's position table (DINOv2 is trained at 518 px,
    37x37 patches; a checkpoint's own table size is used instead). The table is
    resampled once, when the tower is built, to model.image_size as the
    official DINOv2 code does on every forward: bicubic, scale factor
    (grid + 0.1) / native grid, no antialias, in float32 (24x24 at 336 px)."""


@dataclass
class LLMConfig:
    """The causal language model (LLaMA family first)."""

    path: str | None = None
    """Local model directory: a transformers LM (AutoModelForCausalLM), or an
    unmodified LLaVA `llava_llama` folder (llava-v1.5-13b, MoF_Models; told by
    config.json's model_type), whose LLaMA weights load into the LLM and whose
    model.mm_projector.* / model.dino_mm_projector.* initialise clip_projector /
    dino_projector (modeling.base_checkpoint). The fields below must describe
    it. None builds a LlamaForCausalLM from them with random weights."""
    vocab_size: int | None = None
    """Embedding rows for random init; None takes len(tokenizer)."""
    hidden_size: int = 5120
    """Model width."""
    intermediate_size: int = 13824
    """SwiGLU MLP width."""
    num_layers: int = 40
    """Decoder layers."""
    num_heads: int = 40
    """Query heads."""
    num_kv_heads: int | None = None
    """Key/value heads (None: same as num_heads, i.e. no GQA)."""
    max_position_embeddings: int = 4096
    """Longest sequence the rotary embedding is configured for."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """Rotary base frequency."""
    attn_implementation: str = "sdpa"
    """Attention backend: sdpa (default), eager, or flash_attention_2 (needs
    flash-attn and CUDA; anything else is an error at start-up)."""


@dataclass
class LoRAConfig:
    """LoRA adapters (peft) on the LLM's linear layers only."""

    enabled: bool = True
    """Train LoRA adapters on a frozen LLM; False trains the whole LLM."""
    r: int = 128
    """Adapter rank."""
    alpha: int = 256
    """Scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: Any = "all-linear"
    """peft target_modules: "all-linear" (every nn.Linear of the LLM except
    lm_head) or a list of module-name suffixes such as ["q_proj", "v_proj"]."""


@dataclass
class FusionConfig:
    """Forgery-aware fusion: one cross-attention layer, CLIP queries, DINO keys/values,
    biased per head by a 1x1-conv transform of DINO's log attention map."""

    num_heads: int = 16
    """Heads of the cross-attention; must divide the LLM width."""
    dropout: float = 0.1
    """Dropout on attention weights, residual branches and inside the FFN."""
    ffn_mult: int = 4
    """FFN hidden width = ffn_mult x LLM width (ReLU)."""
    norm_eps: float = 1e-6
    """Epsilon of the two post-norm LayerNorms."""
    log_eps: float = 1e-6
    """Added to the DINO attention map before the log."""
    attn_implementation: str = "sdpa"
    """sdpa (fused kernel with the bias as attn_mask) or eager (explicit softmax)."""


@dataclass
class CPMConfig:
    """Classification Probability Mapper: a 2-way softmax over the real/fake logits."""

    enabled: bool = True
    """Add the CPM loss to the LM loss."""
    temperature: float = 10.0
    """Logits of the real/fake tokens are divided by this before the softmax."""
    weight: float = 1.0
    """Total loss = lm_loss + weight x cpm_loss."""
    position: str = "labels"
    """Where the decision position is found: "labels" (the ground-truth
    "...This image is" followed by real/fake) or "argmax" (the reference's
    matching of predicted tokens, for exact reproduction)."""
    answer_prefix: str = "auto"
    """Text after which the next word is the decision. "auto": training derives it
    from the training answers at start-up (the most common spelling of the
    conclusion, e.g. "<CONCLUSION> This image is" in the real MMFR) and stores the
    result with the checkpoint, so evaluation forces exactly the prefix the model
    was trained on; outside training "auto" means DEFAULT_CPM_PREFIX. The position
    is located in any whitespace variant of it (modeling.cpm.prefix_regex); this
    spelling is what score_p_fake appends when an answer has no conclusion, and
    what the real/fake token ids are derived in."""

    @property
    def resolved_prefix(self) -> str:
        """answer_prefix with "auto" resolved to DEFAULT_CPM_PREFIX."""
        return DEFAULT_CPM_PREFIX if self.answer_prefix == "auto" else self.answer_prefix


def _tiny_clip() -> ClipTowerConfig:
    return ClipTowerConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                           patch_size=14, native_image_size=56)


def _tiny_dino() -> DinoTowerConfig:
    return DinoTowerConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                           patch_size=14, native_image_size=56)


@dataclass
class ModelConfig:
    """The whole FakeReasoning model."""

    image_size: int = 336
    """Square input size fed to both towers."""
    image_mean: tuple[float, float, float] = CLIP_MEAN
    """Per-channel normalisation mean (also the padding colour)."""
    image_std: tuple[float, float, float] = CLIP_STD
    """Per-channel normalisation std."""
    apply_exif_orientation: bool = False
    """Rotate/flip each image by its EXIF Orientation tag before padding. Off
    by default, as in the reference (it never reads the tag), so that the
    released weights see the pixels they were trained on; on, a rotated JPEG is
    shown upright as a viewer displays it."""
    clip: ClipTowerConfig = field(default_factory=ClipTowerConfig)
    """CLIP vision tower."""
    dino: DinoTowerConfig = field(default_factory=DinoTowerConfig)
    """DINOv2 tower."""
    dino_backend: str = "transformers"
    """How DINOv2 is built/loaded: "transformers" (Dinov2Model; `dino.path` the
    official dinov2_vitl14_pretrain.pth or a model dir) or "timm"
    (VisionTransformer; `dino.path` the official .pth). Both hold the same
    position table, resampled with the official formula. Never guessed from the path."""
    projector_type: str = "mlp2x_gelu"
    """Projector from each tower to the LLM width."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """Language model."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters on the LLM."""
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """Forgery-aware fusion module."""
    cpm: CPMConfig = field(default_factory=CPMConfig)
    """Classification probability mapper."""
    dtype: str = "float32"
    """Parameter dtype when the model is built: float32, bfloat16 or float16."""

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """`tiny` (CPU tests, a training step well under a second) or `paper`."""
        if name == "tiny":
            cfg = cls(
                image_size=56,
                clip=_tiny_clip(),
                dino=_tiny_dino(),
                llm=LLMConfig(vocab_size=None, hidden_size=64, intermediate_size=128, num_layers=2,
                              num_heads=4, num_kv_heads=2, max_position_embeddings=1024),
                lora=LoRAConfig(r=8, alpha=16, dropout=0.05),
                fusion=FusionConfig(num_heads=4),
                dtype="float32",
            )
        elif name == "paper":
            cfg = cls(
                image_size=336,
                clip=ClipTowerConfig(hidden_size=1024, num_layers=24, num_heads=16,
                                     intermediate_size=4096, patch_size=14, native_image_size=336),
                dino=DinoTowerConfig(hidden_size=1024, num_layers=24, num_heads=16,
                                     intermediate_size=4096, patch_size=14, native_image_size=518),
                llm=LLMConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                              num_layers=40, num_heads=40, num_kv_heads=40,
                              max_position_embeddings=4096, rms_norm_eps=1e-5),
                lora=LoRAConfig(r=128, alpha=256, dropout=0.05),
                fusion=FusionConfig(num_heads=16, dropout=0.1),
                dtype="bfloat16",
            )
        else:
            raise ConfigError(f"unknown model preset {name!r}; choose 'tiny' or 'paper'")
        cfg.validate()
        return cfg

    # ---------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict:
        """Plain nested dict (JSON/YAML safe)."""
        d = dataclasses.asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, data: dict, *, base: "ModelConfig | None" = None) -> "ModelConfig":
        """Build from a (possibly partial) nested dict over `base` (default: the
        dataclass defaults). Unknown keys are an error naming the field path."""
        cfg = copy.deepcopy(base) if base is not None else cls()
        _update_dataclass(cfg, data, prefix="model")
        cfg.image_mean = tuple(float(x) for x in cfg.image_mean)
        cfg.image_std = tuple(float(x) for x in cfg.image_std)
        cfg.validate()
        return cfg

    # ------------------------------------------------------------------ checks
    @property
    def num_image_tokens(self) -> int:
        """Fused image tokens that replace the <image> placeholder (576 in the paper)."""
        return (self.image_size // self.clip.patch_size) ** 2

    def validate(self) -> "ModelConfig":
        """Static checks; raise ConfigError naming the field."""
        _positive(self, "model", ["image_size"])
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ConfigError(f"model.{name} must have 3 values, got {getattr(self, name)!r}")
        if any(s <= 0 for s in self.image_std):
            raise ConfigError(f"model.image_std must be positive, got {self.image_std!r}")
        if not isinstance(self.apply_exif_orientation, bool):
            # A YAML/JSON string such as "false" would otherwise count as true.
            raise ConfigError(f"model.apply_exif_orientation must be true or false, "
                              f"got {self.apply_exif_orientation!r}")
        for tname in ("clip", "dino"):
            t = getattr(self, tname)
            _positive(t, tname, ["hidden_size", "num_layers", "num_heads", "intermediate_size",
                                 "patch_size", "native_image_size"])
            if t.hidden_size % t.num_heads:
                raise ConfigError(f"{tname}.hidden_size={t.hidden_size} is not divisible by "
                                  f"{tname}.num_heads={t.num_heads}")
            if self.image_size % t.patch_size:
                raise ConfigError(f"model.image_size={self.image_size} is not a multiple of "
                                  f"{tname}.patch_size={t.patch_size}")
            _choice(t.attn_implementation, ATTN_IMPLEMENTATIONS, f"{tname}.attn_implementation")
        if self.clip.patch_size != self.dino.patch_size:
            # The DINO attention map (N_dino x N_dino) biases CLIP-query x DINO-key scores.
            raise ConfigError(f"clip.patch_size={self.clip.patch_size} must equal dino.patch_size="
                              f"{self.dino.patch_size}: the fusion bias needs both token grids equal")
        if not -self.clip.num_layers - 1 <= self.clip.select_layer <= self.clip.num_layers:
            raise ConfigError(f"clip.select_layer={self.clip.select_layer} is outside the "
                              f"{self.clip.num_layers + 1} hidden states of the tower")
        if self.dino.intermediate_size % self.dino.hidden_size:
            # DINOv2 (both backends) defines its MLP by an integer mlp_ratio.
            raise ConfigError(f"dino.intermediate_size={self.dino.intermediate_size} must be a "
                              f"multiple of dino.hidden_size={self.dino.hidden_size}")
        _choice(self.dino_backend, DINO_BACKENDS, "model.dino_backend")
        if self.dino_backend == "timm" and self.dino.attn_implementation == "flash_attention_2":
            raise ConfigError("dino.attn_implementation=flash_attention_2 is not available with "
                              "model.dino_backend=timm (timm picks its own fused attention)")
        _choice(self.projector_type, PROJECTOR_TYPES, "model.projector_type")
        _choice(self.dtype, DTYPES, "model.dtype")
        llm = self.llm
        _positive(llm, "llm", ["hidden_size", "intermediate_size", "num_layers", "num_heads",
                               "max_position_embeddings"])
        if llm.vocab_size is not None and llm.vocab_size <= 0:
            raise ConfigError(f"llm.vocab_size must be positive or null, got {llm.vocab_size}")
        if llm.hidden_size % llm.num_heads:
            raise ConfigError(f"llm.hidden_size={llm.hidden_size} is not divisible by "
                              f"llm.num_heads={llm.num_heads}")
        kv = llm.num_kv_heads or llm.num_heads
        if llm.num_heads % kv:
            raise ConfigError(f"llm.num_heads={llm.num_heads} is not a multiple of "
                              f"llm.num_kv_heads={kv}")
        _choice(llm.attn_implementation, ATTN_IMPLEMENTATIONS, "llm.attn_implementation")
        lora = self.lora
        if lora.enabled:
            _positive(lora, "lora", ["r", "alpha"])
            if not 0.0 <= lora.dropout < 1.0:
                raise ConfigError(f"lora.dropout must be in [0, 1), got {lora.dropout}")
            tm = lora.target_modules
            if not (tm == "all-linear" or (isinstance(tm, (list, tuple)) and tm
                                           and all(isinstance(x, str) for x in tm))):
                raise ConfigError(f"lora.target_modules must be 'all-linear' or a non-empty list "
                                  f"of module names, got {tm!r}")
        f = self.fusion
        _positive(f, "fusion", ["num_heads", "ffn_mult", "norm_eps", "log_eps"])
        if llm.hidden_size % f.num_heads:
            raise ConfigError(f"fusion.num_heads={f.num_heads} does not divide llm.hidden_size="
                              f"{llm.hidden_size}")
        if not 0.0 <= f.dropout < 1.0:
            raise ConfigError(f"fusion.dropout must be in [0, 1), got {f.dropout}")
        _choice(f.attn_implementation, ("sdpa", "eager"), "fusion.attn_implementation")
        c = self.cpm
        if c.temperature <= 0:
            raise ConfigError(f"cpm.temperature must be positive, got {c.temperature}")
        if c.weight < 0:
            raise ConfigError(f"cpm.weight must be >= 0, got {c.weight}")
        _choice(c.position, CPM_POSITION_MODES, "cpm.position")
        if not c.answer_prefix.strip():
            raise ConfigError("cpm.answer_prefix must not be empty")
        return self

    def check_runtime(self) -> None:
        """Checks that depend on the machine, run when the model is built (start-up),
        so that an impossible attention backend fails before any data is read."""
        import torch  # local: keep the config importable without torch side effects

        wanted = [(f"{n}.attn_implementation", getattr(self, n).attn_implementation)
                  for n in ("clip", "dino", "llm")]
        for name, impl in wanted:
            if impl != "flash_attention_2":
                continue
            if importlib.util.find_spec("flash_attn") is None:
                raise ConfigError(f"{name}=flash_attention_2 but the flash-attn package is not "
                                  f"installed (pip install flash-attn, or use 'sdpa')")
            if not torch.cuda.is_available():
                raise ConfigError(f"{name}=flash_attention_2 needs a CUDA device; none is "
                                  f"visible (use 'sdpa' on CPU)")
            if self.dtype == "float32":
                raise ConfigError(f"{name}=flash_attention_2 needs model.dtype bfloat16 or "
                                  f"float16, got float32")


def _positive(obj: Any, prefix: str, names: list[str]) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{prefix}.{n} must be a positive number, got {v!r}")


def _choice(value: Any, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {list(allowed)}")


def _update_dataclass(obj: Any, data: dict, prefix: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown config field {prefix}.{key} (known: {sorted(fields)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _update_dataclass(current, value, f"{prefix}.{key}")
        else:
            setattr(obj, key, value)
