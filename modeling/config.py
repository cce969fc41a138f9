"""Typed configuration of the FakeReasoning model, with the `tiny` and `paper` presets.

Everything that decides the shape of the model or where its weights come from
is a field here (model paths included: never environment variables), so that
a recipe fully describes a run. `validate()` names the offending field in every
error; runtime-only checks (flash-attn importable, CUDA present) are in
`check_runtime()`, called when the model is built, so that a config can still be
written and validated on a machine without a GPU.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Literal

from common.config_loading import ConfigError, check_fields, load_section

# The choices of the model's string fields (the loader checks values against them).
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]
DinoBackend = Literal["transformers", "timm"]
CpmPosition = Literal["labels", "argmax"]
Dtype = Literal["float32", "bfloat16", "float16"]
ProjectorType = Literal["mlp2x_gelu"]
ModelPreset = Literal["tiny", "paper"]

# The conclusion's spelling in the real MMFR answers and in the reference's
# hard-coded CPM ids (910 = "▁This": a space after the tag).
DEFAULT_CPM_PREFIX = "<CONCLUSION> This image is"

# CLIP's normalisation constants (OpenAI CLIP); both towers see the same tensor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
    attn_implementation: AttnImplementation = "sdpa"
    """Attention backend of the tower: sdpa, eager or flash_attention_2."""


@dataclass
class ClipTowerConfig(VisionTowerConfig):
    """CLIP vision tower (transformers CLIPVisionModel)."""

    select_layer: int = -2
    """Index into hidden_states whose patch tokens are used (-2: second to last layer)."""
    hidden_act: Literal["quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"] = "quick_gelu"
    """Activation of the MLP of a random-init tower (OpenAI CLIP uses quick_gelu;
    a checkpoint at `path` brings its own); names of transformers' ACT2FN."""


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
    dino_projector (modeling.checkpoints.base). The fields below must describe
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
    attn_implementation: AttnImplementation = "sdpa"
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
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
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
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
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
    position: CpmPosition = "labels"
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
    dino_backend: DinoBackend = "transformers"
    """How DINOv2 is built/loaded: "transformers" (Dinov2Model; `dino.path` the
    official dinov2_vitl14_pretrain.pth or a model dir) or "timm"
    (VisionTransformer; `dino.path` the official .pth). Both hold the same
    position table, resampled with the official formula. Never guessed from the path."""
    projector_type: ProjectorType = "mlp2x_gelu"
    """Projector from each tower to the LLM width."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """Language model."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters on the LLM."""
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """Forgery-aware fusion module."""
    cpm: CPMConfig = field(default_factory=CPMConfig)
    """Classification probability mapper."""
    dtype: Dtype = "float32"
    """Parameter dtype when the model is built: float32, bfloat16 or float16."""

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: ModelPreset) -> "ModelConfig":
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
            raise ConfigError(f"model.preset={name!r}: must be one of ['tiny', 'paper']")
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
        dataclass defaults), through the typed loader (common.config_loading):
        every value is checked against its field's type, unknown keys are an
        error naming the dotted field (`model.llm.hidden_sze`)."""
        return load_section(cls, data, "model", base=base).validate()

    # ------------------------------------------------------------------ checks
    @property
    def num_image_tokens(self) -> int:
        """Fused image tokens that replace the <image> placeholder (576 in the paper)."""
        return (self.image_size // self.clip.patch_size) ** 2

    def validate(self) -> "ModelConfig":
        """Types (every field against its annotation, choices included), then ranges
        and combinations; raise ConfigError naming the dotted field."""
        check_fields(self, "model")
        _positive(self, "model", ["image_size"])
        if any(s <= 0 for s in self.image_std):
            raise ConfigError(f"model.image_std={self.image_std!r}: must be positive")
        for tname in ("clip", "dino"):
            self._check_tower(tname)
        if self.clip.patch_size != self.dino.patch_size:
            # The DINO attention map (N_dino x N_dino) biases CLIP-query x DINO-key scores.
            raise ConfigError(f"model.clip.patch_size={self.clip.patch_size} must equal model.dino.patch_size="
                              f"{self.dino.patch_size}: the fusion bias needs both token grids equal")
        if not -self.clip.num_layers - 1 <= self.clip.select_layer <= self.clip.num_layers:
            raise ConfigError(f"model.clip.select_layer={self.clip.select_layer} is outside the "
                              f"{self.clip.num_layers + 1} hidden states of the tower")
        if self.dino.intermediate_size % self.dino.hidden_size:
            # DINOv2 (both backends) defines its MLP by an integer mlp_ratio.
            raise ConfigError(f"model.dino.intermediate_size={self.dino.intermediate_size} must be a "
                              f"multiple of model.dino.hidden_size={self.dino.hidden_size}")
        if self.dino_backend == "timm" and self.dino.attn_implementation == "flash_attention_2":
            raise ConfigError("model.dino.attn_implementation=flash_attention_2 is not available with "
                              "model.dino_backend=timm (timm picks its own fused attention)")
        self._check_llm()
        self._check_heads()
        return self

    def _check_tower(self, tname: str) -> None:
        t = getattr(self, tname)
        _positive(t, f"model.{tname}", ["hidden_size", "num_layers", "num_heads", "intermediate_size",
                                        "patch_size", "native_image_size"])
        if t.hidden_size % t.num_heads:
            raise ConfigError(f"model.{tname}.hidden_size={t.hidden_size} is not divisible by "
                              f"model.{tname}.num_heads={t.num_heads}")
        if self.image_size % t.patch_size:
            raise ConfigError(f"model.image_size={self.image_size} is not a multiple of "
                              f"model.{tname}.patch_size={t.patch_size}")

    def _check_llm(self) -> None:
        llm = self.llm
        _positive(llm, "model.llm", ["hidden_size", "intermediate_size", "num_layers", "num_heads",
                                     "max_position_embeddings"])
        if llm.vocab_size is not None and llm.vocab_size <= 0:
            raise ConfigError(f"model.llm.vocab_size={llm.vocab_size}: must be positive or null")
        if llm.hidden_size % llm.num_heads:
            raise ConfigError(f"model.llm.hidden_size={llm.hidden_size} is not divisible by "
                              f"model.llm.num_heads={llm.num_heads}")
        kv = llm.num_kv_heads or llm.num_heads
        if llm.num_heads % kv:
            raise ConfigError(f"model.llm.num_heads={llm.num_heads} is not a multiple of "
                              f"model.llm.num_kv_heads={kv}")
        lora = self.lora
        if lora.enabled:
            _positive(lora, "model.lora", ["r", "alpha"])
            if not 0.0 <= lora.dropout < 1.0:
                raise ConfigError(f"model.lora.dropout={lora.dropout}: must be in [0, 1)")
            if not lora.target_modules:
                raise ConfigError("model.lora.target_modules=[]: must be 'all-linear' or a non-empty "
                                  "list of module names")

    def _check_heads(self) -> None:
        """The fusion module and the CPM (the parts on top of the LLM)."""
        f = self.fusion
        _positive(f, "model.fusion", ["num_heads", "ffn_mult", "norm_eps", "log_eps"])
        if self.llm.hidden_size % f.num_heads:
            raise ConfigError(f"model.fusion.num_heads={f.num_heads} does not divide model.llm.hidden_size="
                              f"{self.llm.hidden_size}")
        if not 0.0 <= f.dropout < 1.0:
            raise ConfigError(f"model.fusion.dropout={f.dropout}: must be in [0, 1)")
        c = self.cpm
        if c.temperature <= 0:
            raise ConfigError(f"model.cpm.temperature={c.temperature}: must be positive")
        if c.weight < 0:
            raise ConfigError(f"model.cpm.weight={c.weight}: must be >= 0")
        if not c.answer_prefix.strip():
            raise ConfigError(f"model.cpm.answer_prefix={c.answer_prefix!r}: must not be empty")

    def check_runtime(self) -> None:
        """Checks that depend on the machine, run when the model is built (start-up),
        so that an impossible attention backend fails before any data is read."""
        import torch  # local: keep the config importable without torch side effects

        wanted = [(f"model.{n}.attn_implementation", getattr(self, n).attn_implementation)
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
        if v <= 0:
            raise ConfigError(f"{prefix}.{n}={v!r}: must be a positive number")
