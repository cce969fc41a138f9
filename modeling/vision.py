"""The two frozen vision towers.

- CLIP (transformers CLIPVisionModel): patch tokens of a configurable hidden
  layer (default -2, LLaVA's choice).
- DINOv2, through transformers (Dinov2Model) or timm (VisionTransformer built
  like `vit_large_patch14_dinov2`, loading the official `.pth` through timm's
  own `checkpoint_filter_fn`): the last block's pre-norm patch tokens and that
  block's softmax attention map, all heads.

The attention map is computed for the last block only: forward hooks on the
last block's query/key projections keep the q and k the block computes anyway,
and the softmax is taken once from them. Every block keeps its fast (sdpa or
fused) attention, and no projection is run twice. Hooks also keep the towers
usable under ZeRO-3, where parameters are only materialised inside their own
module's forward.
"""
from __future__ import annotations

import torch
from torch import nn

from modeling.config import ConfigError, ModelConfig

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
    norm, last-block softmax attention [B, H, 1+N, 1+N] in float32)."""

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
            if d.path:
                load_timm_dino_checkpoint(self.model, d.path)
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


def _build_hf_dino(cfg: ModelConfig, dtype: torch.dtype):
    from transformers import Dinov2Config, Dinov2Model

    d = cfg.dino
    if d.path:
        model = Dinov2Model.from_pretrained(d.path, attn_implementation=d.attn_implementation,
                                            dtype=dtype)
        mc = model.config
        for f, got in (("hidden_size", mc.hidden_size), ("num_layers", mc.num_hidden_layers),
                       ("num_heads", mc.num_attention_heads), ("patch_size", mc.patch_size)):
            _check_loaded("dino", f, getattr(d, f), got, d.path)
        return model
    mc = Dinov2Config(
        hidden_size=d.hidden_size, num_hidden_layers=d.num_layers, num_attention_heads=d.num_heads,
        mlp_ratio=d.intermediate_size // d.hidden_size, image_size=d.native_image_size,
        patch_size=d.patch_size, layer_norm_eps=d.layer_norm_eps,
        layerscale_value=d.layerscale_value, qkv_bias=True, hidden_act="gelu")
    return Dinov2Model._from_config(mc, attn_implementation=d.attn_implementation, dtype=dtype)


def timm_dino_kwargs(cfg: ModelConfig) -> dict:
    """VisionTransformer kwargs of timm's `vit_large_patch14_dinov2` (patch 14, width
    1024, 24 blocks, 16 heads, LayerScale 1e-5) with the sizes taken from `cfg.dino`,
    built directly at `cfg.image_size` (no head)."""
    d = cfg.dino
    return dict(img_size=cfg.image_size, patch_size=d.patch_size, embed_dim=d.hidden_size,
                depth=d.num_layers, num_heads=d.num_heads,
                mlp_ratio=d.intermediate_size / d.hidden_size, init_values=d.layerscale_value,
                qkv_bias=True, num_classes=0)


def build_timm_dino(cfg: ModelConfig, dtype: torch.dtype = torch.float32):
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**timm_dino_kwargs(cfg))
    return model.to(dtype)


def load_timm_dino_checkpoint(model: nn.Module, path: str) -> None:
    """Load the official DINOv2 checkpoint (facebookresearch/dinov2 key layout:
    cls_token, pos_embed, mask_token, patch_embed.proj.*, blocks.N.{norm1,attn.qkv,
    attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}.*, norm.*) with timm's own
    checkpoint filter, which drops mask_token and interpolates pos_embed to the
    model's grid. `.pth` is read with weights_only=True; `.safetensors` also works."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not state:
        raise ConfigError(f"dino.path={path}: not a state dict")
    state = checkpoint_filter_fn(state, model)
    ref = model.state_dict()
    state = {k: v.to(ref[k].dtype) if k in ref else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"dino.path={path} does not match the timm DINOv2 built from the "
                          f"dino.* fields: missing keys {sorted(missing)}, unexpected keys "
                          f"{sorted(unexpected)}")
