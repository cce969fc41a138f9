"""The two frozen vision towers.

- CLIP (transformers CLIPVisionModel): patch tokens of a configurable hidden
  layer (default -2, LLaVA's choice).
- DINOv2, through transformers (Dinov2Model) or timm (VisionTransformer built
  like `vit_large_patch14_dinov2`): the last block's pre-norm patch tokens and
  that block's softmax attention map, all heads. Both backends read the
  official `dinov2_vitl14_pretrain.pth` (facebookresearch/dinov2 key layout);
  the transformers one also reads a transformers model directory.

DINOv2 position table. The official model keeps its 518 px (37x37) table and
interpolates it on every forward (bicubic, scale factor (24 + 0.1) / 37, no
antialias, in float32); transformers (size=(24, 24), no offset) and timm
(antialias) each resample differently, by up to a few percent on the last
block's tokens. Here the table is resampled once, when the tower is built, with
the official formula (`resample_dinov2_pos_embed`), and the tower is built at
the input grid, so both backends hold the reference's table and no forward
interpolates. A random-init tower is the library's random model at
`dino.native_image_size` with its table resampled the same way.

The attention map is computed for the last block only: forward hooks on the
last block's query/key projections keep the q and k the block computes anyway,
and the softmax is taken once from them. Every block keeps its fast (sdpa or
fused) attention, and no projection is run twice. Hooks also keep the towers
usable under ZeRO-3, where parameters are only materialised inside their own
module's forward.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from modeling.config import ConfigError, DinoTowerConfig, ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def _check_loaded(tower: str, field: str, expected, got, path: str) -> None:
    if expected != got:
        raise ConfigError(f"{tower}.{field}={expected} but the checkpoint at {path} has {got}; "
                          f"set {tower}.{field} to match the checkpoint")


class ClipTower(nn.Module):
    """CLIP vision tower returning patch tokens [B, N, hidden] of layer `select_layer`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        c = cfg.clip
        dtype = torch_dtype(cfg.dtype)
        if c.path:
            self.model = CLIPVisionModel.from_pretrained(
                c.path, attn_implementation=c.attn_implementation, dtype=dtype)
            vc = self.model.config
            for f, got in (("hidden_size", vc.hidden_size), ("num_layers", vc.num_hidden_layers),
                           ("num_heads", vc.num_attention_heads), ("patch_size", vc.patch_size)):
                _check_loaded("clip", f, getattr(c, f), got, c.path)
        else:
            vc = CLIPVisionConfig(
                hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                image_size=c.native_image_size, patch_size=c.patch_size,
                hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps)
            self.model = CLIPVisionModel._from_config(
                vc, attn_implementation=c.attn_implementation, dtype=dtype)
        # CLIP's position embeddings are a fixed table: a different input size
        # would need interpolate_pos_encoding, which the recipe never uses.
        self.interpolate = cfg.image_size != self.model.config.image_size
        self.select_layer = c.select_layer
        self.hidden_size = c.hidden_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True,
                         interpolate_pos_encoding=self.interpolate)
        return out.hidden_states[self.select_layer][:, 1:]


class DinoTower(nn.Module):
    """DINOv2 tower: forward(pixel_values) -> (patch tokens [B, N, D] before the final
    norm, last-block softmax attention [B, H, 1+N, 1+N] in float32).

    The model is built at `cfg.image_size` and holds the official DINOv2
    resample of its source's position table (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dino
        self.backend = cfg.dino_backend
        self.num_heads = d.num_heads
        self.hidden_size = d.hidden_size
        self.head_dim = d.hidden_size // d.num_heads
        self.num_prefix_tokens = 1
        dtype = torch_dtype(cfg.dtype)
        if self.backend == "transformers":
            self.model = _build_hf_dino(cfg, dtype)
            last = self.model.encoder.layer[-1]
            last.attention.q_proj.register_forward_hook(self._keep("q"))
            last.attention.k_proj.register_forward_hook(self._keep("k"))
        else:
            self.model = build_timm_dino(cfg, dtype)
            last = self.model.blocks[-1]
            self.num_prefix_tokens = self.model.num_prefix_tokens
            last.attn.qkv.register_forward_hook(self._keep("qkv"))
        last.register_forward_hook(self._keep("block_out"))
        self._cache: dict[str, torch.Tensor] = {}

    def _keep(self, name: str):
        def hook(module, args, output):
            self._cache[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._cache = {}
        if self.backend == "transformers":
            self.model(pixel_values=pixel_values)
            q, k = self._cache["q"], self._cache["k"]
        else:
            self.model.forward_features(pixel_values)
            qkv = self._cache["qkv"]
            q, k, _ = qkv.chunk(3, dim=-1)
            attn_mod = self.model.blocks[-1].attn
            # timm's DINOv2 has identity q/k norms; applied anyway for qk-norm variants.
            q = attn_mod.q_norm(q.unflatten(-1, (self.num_heads, self.head_dim))).flatten(-2)
            k = attn_mod.k_norm(k.unflatten(-1, (self.num_heads, self.head_dim))).flatten(-2)
        block_out = self._cache["block_out"]
        self._cache = {}
        attn = last_block_attention(q, k, self.num_heads)
        return block_out[:, self.num_prefix_tokens:], attn


def last_block_attention(q: torch.Tensor, k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head, in float32: q, k [B, T, H*d] -> [B, H, T, T]."""
    b, t, width = q.shape
    hd = width // num_heads
    qh = q.float().view(b, t, num_heads, hd).transpose(1, 2)
    kh = k.float().view(b, t, num_heads, hd).transpose(1, 2)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * hd ** -0.5
    return scores.softmax(dim=-1)


# ------------------------------------------------------------------ DINOv2 position table
# facebookresearch/dinov2 vision_transformer.py: interpolate_offset=0.1, interpolate_antialias=False.
DINOV2_INTERPOLATE_OFFSET = 0.1


def resample_dinov2_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """The official DINOv2 `interpolate_pos_encoding` for a square `grid` x `grid` input.

    pos_embed [1, 1 + M*M, D] (class row first). The patch rows are resized in
    float32 by bicubic interpolation with scale factor (grid + 0.1) / M and no
    antialias; the class row is kept; the result is cast back to the input
    dtype. Like the official code, a table already at `grid` is returned as is.
    Cast the table to the model's dtype first to reproduce a model that was cast
    (bf16) before its first forward: the official code interpolates that value.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"a DINOv2 position table is [1, 1 + M*M, D], got {tuple(pos_embed.shape)}")
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"position table has {n} patch rows, not a square grid")
    if m == grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    cls_row, patch = pos_embed[:, :1], pos_embed[:, 1:]
    patch = patch.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    scale = (grid + DINOV2_INTERPOLATE_OFFSET) / m
    patch = nn.functional.interpolate(patch, scale_factor=(scale, scale), mode="bicubic",
                                      antialias=False)
    if tuple(patch.shape[-2:]) != (grid, grid):
        raise ValueError(f"interpolating a {m}x{m} table by {scale} gave "
                         f"{tuple(patch.shape[-2:])}, not {grid}x{grid}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat((cls_row, patch.to(pos_embed.dtype)), dim=1)


def _resample_table(state: dict, key: str, grid: int, dtype: torch.dtype, source: str) -> None:
    """Replace state[key] (a DINOv2 position table at its own grid) by the official
    resample to `grid`, from its value in the model dtype."""
    try:
        state[key] = resample_dinov2_pos_embed(state[key].to(dtype), grid)
    except ValueError as exc:
        raise ConfigError(f"{source}: {key}: {exc}") from exc


# ------------------------------------------------------------------ official checkpoint
_OFFICIAL_TOP = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
                 "mask_token": "embeddings.mask_token",
                 "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
                 "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
                 "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
# Block entries whose Dinov2Model name differs; norm1, norm2, mlp.fc1, mlp.fc2 are spelled alike.
_OFFICIAL_BLOCK = {"attn.proj.weight": "attention.o_proj.weight",
                   "attn.proj.bias": "attention.o_proj.bias",
                   "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}


def read_official_dino_checkpoint(path: str, d: DinoTowerConfig) -> dict[str, torch.Tensor]:
    """The state dict of an official DINOv2 checkpoint (`dinov2_vitl14_pretrain.pth`:
    cls_token, pos_embed [1, 1370, 1024], mask_token, patch_embed.proj.*,
    blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2,
    ls2.gamma}.*, norm.*), checked against the dino.* sizes. `.pth` is read with
    weights_only=True; `.safetensors` also works."""
    from modeling.checkpoints.tensor_io import CheckpointError, read_tensor_file

    try:
        state = read_tensor_file(path)
    except CheckpointError as exc:
        raise ConfigError(f"dino.path={path}: {exc}") from exc
    if not state:
        raise ConfigError(f"dino.path={path}: not a state dict")
    absent = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight") if k not in state]
    if absent:
        raise ConfigError(f"dino.path={path} is not in the official DINOv2 key layout "
                          f"(no {absent}); expected dinov2_vitl14_pretrain.pth or the same keys")
    if "register_tokens" in state:
        raise ConfigError(f"dino.path={path} has register tokens (a dinov2_*_reg checkpoint); "
                          f"only the register-free DINOv2 (dinov2_vitl14_pretrain.pth) is supported")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    for f, got in (("hidden_size", state["cls_token"].shape[-1]), ("num_layers", len(blocks)),
                   ("patch_size", state["patch_embed.proj.weight"].shape[-1]),
                   ("intermediate_size", None if fc1 is None else fc1.shape[0])):
        _check_loaded("dino", f, getattr(d, f), got, path)
    return state


def official_to_hf_dino(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DINOv2 keys -> Dinov2Model keys; the fused qkv projection is split
    into q_proj, k_proj, v_proj (its output rows are q, k, v in that order).
    Keys it does not know keep their name and show up as unexpected."""
    out = {}
    for key, value in state.items():
        if key in _OFFICIAL_TOP:
            out[_OFFICIAL_TOP[key]] = value
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if m is None:
            out[key] = value
            continue
        prefix, rest = f"encoder.layer.{m.group(1)}.", m.group(2)
        if rest in ("attn.qkv.weight", "attn.qkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}attention.{name}.{kind}"] = part.clone()
        else:
            out[prefix + _OFFICIAL_BLOCK.get(rest, rest)] = value
    return out


# ------------------------------------------------------------------ transformers backend
def _hf_dino_config(d: DinoTowerConfig, image_size: int):
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=d.hidden_size, num_hidden_layers=d.num_layers, num_attention_heads=d.num_heads,
        mlp_ratio=d.intermediate_size // d.hidden_size, image_size=image_size,
        patch_size=d.patch_size, layer_norm_eps=d.layer_norm_eps,
        layerscale_value=d.layerscale_value, qkv_bias=True, hidden_act="gelu")


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers model directory (single or sharded files)."""
    from modeling.checkpoints.tensor_io import CheckpointError, read_weights

    try:
        return read_weights(path)
    except CheckpointError as exc:
        raise ConfigError(f"dino.path={path}: {exc}") from exc


def _build_hf_dino(cfg: ModelConfig, dtype: torch.dtype):
    """Dinov2Model built at the input grid, its position table resampled from the
    source's grid with the official formula.

    The whole state dict is assembled on the CPU first (official checkpoint,
    model directory, or the library's random model at the native size) and
    handed to `from_pretrained(None, config=..., state_dict=...)`, so that under
    ZeRO-3 transformers partitions and loads it as it does any checkpoint.
    """
    from transformers import Dinov2Config, Dinov2Model

    d = cfg.dino
    grid = cfg.image_size // d.patch_size
    if not d.path and torch.empty(0).device.type == "meta":
        # Shapes only (the parameter summary): no values to resample, and
        # from_pretrained refuses the meta device.
        return Dinov2Model._from_config(_hf_dino_config(d, cfg.image_size),
                                        attn_implementation=d.attn_implementation, dtype=dtype)
    if not d.path:
        # The library's random model at the native grid, as the reference's tower
        # would be without weights; only its table then differs (resampled below).
        state = Dinov2Model(_hf_dino_config(d, d.native_image_size)).state_dict()
        config, source = _hf_dino_config(d, cfg.image_size), "dino (random init)"
    elif Path(d.path).is_dir():
        config = Dinov2Config.from_pretrained(d.path)
        if config.model_type != "dinov2":
            raise ConfigError(f"dino.path={d.path} holds a {config.model_type!r} model, not dinov2")
        for f, got in (("hidden_size", config.hidden_size), ("num_layers", config.num_hidden_layers),
                       ("num_heads", config.num_attention_heads), ("patch_size", config.patch_size)):
            _check_loaded("dino", f, getattr(d, f), got, d.path)
        state, source = _read_hf_weights(Path(d.path)), f"dino.path={d.path}"
    elif Path(d.path).is_file():
        state = official_to_hf_dino(read_official_dino_checkpoint(d.path, d))
        config, source = _hf_dino_config(d, cfg.image_size), f"dino.path={d.path}"
    else:
        raise ConfigError(f"dino.path={d.path} does not exist")
    table = [k for k in state if k.endswith("embeddings.position_embeddings")]
    if len(table) != 1:
        raise ConfigError(f"{source}: expected one embeddings.position_embeddings, found {table}")
    _resample_table(state, table[0], grid, dtype, source)
    config.image_size = cfg.image_size
    # A plain dict: under ZeRO-3, transformers' key conversion fails on a state
    # dict that carries nn.Module's `_metadata` (as `Module.state_dict()` does).
    model, info = Dinov2Model.from_pretrained(
        None, config=config, state_dict=dict(state), attn_implementation=d.attn_implementation,
        dtype=dtype, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
        raise ConfigError(f"{source} does not match the Dinov2Model built from the dino.* fields: "
                          f"missing keys {sorted(info['missing_keys'])}, unexpected keys "
                          f"{sorted(info['unexpected_keys'])}, mismatched "
                          f"{sorted(info['mismatched_keys'])}")
    return model


# ------------------------------------------------------------------ timm backend
def timm_dino_kwargs(cfg: ModelConfig, image_size: int | None = None) -> dict:
    """VisionTransformer kwargs of timm's `vit_large_patch14_dinov2` (patch 14, width
    1024, 24 blocks, 16 heads, LayerScale 1e-5) with the sizes taken from `cfg.dino`,
    built at `image_size` (default `cfg.image_size`), no head."""
    d = cfg.dino
    return dict(img_size=image_size or cfg.image_size, patch_size=d.patch_size,
                embed_dim=d.hidden_size, depth=d.num_layers, num_heads=d.num_heads,
                mlp_ratio=d.intermediate_size / d.hidden_size, init_values=d.layerscale_value,
                qkv_bias=True, num_classes=0)


def build_timm_dino(cfg: ModelConfig, dtype: torch.dtype = torch.float32):
    """timm VisionTransformer at `cfg.image_size` in `dtype`: loaded from the official
    checkpoint at `dino.path`, or timm's random model at `dino.native_image_size`
    with its position table resampled by the official formula."""
    from timm.models.vision_transformer import VisionTransformer

    d = cfg.dino
    if d.path:
        model = VisionTransformer(**timm_dino_kwargs(cfg)).to(dtype)
        load_timm_dino_checkpoint(model, d.path, d)
        return model
    # timm's random model at the native grid comes first, so that a seed gives the
    # weights timm would give the reference's tower; only its table is then resampled.
    state = VisionTransformer(**timm_dino_kwargs(cfg, d.native_image_size)).state_dict()
    model = VisionTransformer(**timm_dino_kwargs(cfg)).to(dtype)
    _resample_table(state, "pos_embed", model.patch_embed.grid_size[0], dtype, "dino (random init)")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return model


def load_timm_dino_checkpoint(model: nn.Module, path: str, d: DinoTowerConfig) -> None:
    """Load the official DINOv2 checkpoint into a timm VisionTransformer.

    The table is resampled to the model's grid with the official formula before
    timm's own `checkpoint_filter_fn` sees it (which then only drops
    mask_token): timm's resample would antialias."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if not Path(path).is_file():
        raise ConfigError(f"dino.path={path} is not a file; model.dino_backend=timm reads the "
                          f"official checkpoint (dinov2_vitl14_pretrain.pth)")
    state = read_official_dino_checkpoint(path, d)
    dtype = model.pos_embed.dtype
    _resample_table(state, "pos_embed", model.patch_embed.grid_size[0], dtype, f"dino.path={path}")
    table = state["pos_embed"]
    state = checkpoint_filter_fn(state, model)
    if state.get("pos_embed") is not table:
        raise ConfigError(f"dino.path={path}: timm's checkpoint filter changed the position table "
                          f"(shape {tuple(table.shape)}); the model expects "
                          f"{tuple(model.pos_embed.shape)}")
    ref = model.state_dict()
    state = {k: v.to(ref[k].dtype) if k in ref else v for k, v in state.items()}
    bad_shapes = sorted(k for k, v in state.items() if k in ref and v.shape != ref[k].shape)
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in state.items() if k not in bad_shapes}, strict=False)
    if missing or unexpected or bad_shapes:
        raise ConfigError(f"dino.path={path} does not match the timm DINOv2 built from the "
                          f"dino.* fields: missing keys {sorted(missing)}, unexpected keys "
                          f"{sorted(unexpected)}, wrong shapes {bad_shapes}")
