"""Vision towers: CLIP layer selection, DINOv2 last-block attention (transformers and
timm), the official DINOv2 checkpoint layout in both backends, local HF dirs, and the
DINOv2 position table resampled exactly as the official code interpolates it."""
import math

import pytest
import torch
import torch.nn.functional as F

from modeling.config import ConfigError, ModelConfig
from modeling.vision import (ClipTower, DinoTower, build_timm_dino, resample_dinov2_pos_embed,
                             timm_dino_kwargs)

torch.set_num_threads(1)


def _cfg(**kw):
    cfg = ModelConfig.preset("tiny")
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _pixels(b=2, s=56, seed=0):
    return torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(seed))


def test_clip_tower_selects_second_to_last_layer_patch_tokens():
    cfg = _cfg()
    torch.manual_seed(0)
    tower = ClipTower(cfg).eval()
    seen = {}
    layers = getattr(tower.model, "vision_model", tower.model).encoder.layers
    layers[-2].register_forward_hook(lambda m, a, o: seen.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    x = _pixels()
    out = tower(x)
    assert out.shape == (2, cfg.num_image_tokens, cfg.clip.hidden_size) and out.dtype == torch.float32
    torch.testing.assert_close(out, seen["h"][:, 1:])


def _eager_dino_reference(tower: DinoTower, x):
    """The same weights in a Dinov2Model switched entirely to eager attention, with
    output_attentions: its last attention map and last pre-norm hidden state."""
    from transformers import Dinov2Model
    eager = Dinov2Model._from_config(tower.model.config, attn_implementation="eager")
    eager.load_state_dict(tower.model.state_dict())
    out = eager.eval()(pixel_values=x, output_attentions=True, output_hidden_states=True)
    return out.hidden_states[-1], out.attentions[-1], out.last_hidden_state


def test_dino_transformers_last_block_tokens_and_attention_match_eager():
    cfg = _cfg()
    torch.manual_seed(0)
    tower = DinoTower(cfg).eval()
    assert tower.model.config._attn_implementation == "sdpa"  # blocks keep the fast path
    x = _pixels()
    with torch.no_grad():
        tokens, attn = tower(x)
        hidden, ref_attn, normed = _eager_dino_reference(tower, x)
    n = cfg.num_image_tokens
    assert tokens.shape == (2, n, cfg.dino.hidden_size)
    assert attn.shape == (2, cfg.dino.num_heads, n + 1, n + 1) and attn.dtype == torch.float32
    torch.testing.assert_close(attn, ref_attn, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens, hidden[:, 1:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tokens, normed[:, 1:], atol=1e-3)  # pre-norm, not the final norm
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, cfg.dino.num_heads, n + 1))


def _official_layout_checkpoint(path, dim=64, depth=2, grid=5, patch=14, mlp=256, seed=0):
    """A tiny DINOv2 state dict spelled exactly like facebookresearch/dinov2's
    dinov2_vitl14_pretrain.pth (keys written out here, not taken from timm)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim),
          "mask_token": r(1, dim), "patch_embed.proj.weight": r(dim, 3, patch, patch),
          "patch_embed.proj.bias": r(dim), "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(dim), p + "norm1.bias": r(dim),
                   p + "attn.qkv.weight": r(3 * dim, dim), p + "attn.qkv.bias": r(3 * dim),
                   p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
                   p + "ls1.gamma": r(dim).abs() + 0.1, p + "norm2.weight": 1 + r(dim),
                   p + "norm2.bias": r(dim), p + "mlp.fc1.weight": r(mlp, dim),
                   p + "mlp.fc1.bias": r(mlp), p + "mlp.fc2.weight": r(dim, mlp),
                   p + "mlp.fc2.bias": r(dim), p + "ls2.gamma": r(dim).abs() + 0.1})
    torch.save(sd, path)
    return sd


def test_timm_dino_loads_official_layout_and_matches_manual_attention(tmp_path):
    ckpt = tmp_path / "dinov2_vitl14_pretrain.pth"
    sd = _official_layout_checkpoint(ckpt, grid=5)  # trained grid 5x5; the model runs 4x4
    cfg = _cfg(dino_backend="timm")
    cfg.dino.path = str(ckpt)
    tower = DinoTower(cfg).eval()
    state = tower.model.state_dict()
    for k, v in sd.items():
        if k == "mask_token":
            assert k not in state
        elif k == "pos_embed":
            assert state[k].shape == (1, 1 + 16, 64)
            torch.testing.assert_close(state[k], official_interpolate(v, 4, 4), atol=1e-6, rtol=0)
        else:
            torch.testing.assert_close(state[k], v, msg=k)

    captured = {}
    last = tower.model.blocks[-1]
    last.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
    x = _pixels()
    with torch.no_grad():
        tokens, attn = tower(x)
        h = torch.nn.functional.layer_norm(captured["x"], (64,), sd["blocks.1.norm1.weight"],
                                           sd["blocks.1.norm1.bias"], eps=1e-6)
        qkv = h @ sd["blocks.1.attn.qkv.weight"].T + sd["blocks.1.attn.qkv.bias"]
        q, k, _ = qkv.view(2, 17, 3, 4, 16).permute(2, 0, 3, 1, 4)
        manual = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
        block_out = last(captured["x"])
    torch.testing.assert_close(attn, manual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens, block_out[:, 1:])
    assert tokens.shape == (2, 16, 64) and attn.shape == (2, 4, 17, 17)


def test_timm_dino_checkpoint_mismatch_lists_keys(tmp_path):
    ckpt = tmp_path / "bad.pth"
    sd = _official_layout_checkpoint(ckpt)
    del sd["blocks.1.ls2.gamma"]
    torch.save(sd, ckpt)
    cfg = _cfg(dino_backend="timm")
    cfg.dino.path = str(ckpt)
    with pytest.raises(ConfigError, match=r"blocks\.1\.ls2\.gamma"):
        DinoTower(cfg)


def test_timm_and_transformers_backends_have_the_same_interface():
    cfg = _cfg(dino_backend="timm")
    tower = DinoTower(cfg).eval()
    tokens, attn = tower(_pixels())
    assert tokens.shape == (2, 16, 64) and attn.shape == (2, 4, 17, 17)
    assert type(build_timm_dino(cfg)).__name__ == "VisionTransformer"


def test_local_transformers_directories_are_loaded(tmp_path):
    cfg = _cfg()
    torch.manual_seed(0)
    clip, dino = ClipTower(cfg).eval(), DinoTower(cfg).eval()
    clip.model.save_pretrained(tmp_path / "clip")
    dino.model.save_pretrained(tmp_path / "dino")
    cfg2 = _cfg()
    cfg2.clip.path, cfg2.dino.path = str(tmp_path / "clip"), str(tmp_path / "dino")
    clip2, dino2 = ClipTower(cfg2).eval(), DinoTower(cfg2).eval()
    x = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(clip2(x), clip(x))
        for a, b in zip(dino2(x), dino(x)):
            torch.testing.assert_close(a, b)
    cfg3 = _cfg()
    cfg3.dino.path = str(tmp_path / "dino")
    cfg3.dino.hidden_size = 128
    cfg3.dino.intermediate_size = 512
    with pytest.raises(ConfigError, match="dino.hidden_size=128"):
        DinoTower(cfg3)


def test_bf16_towers():
    cfg = _cfg(dtype="bfloat16")
    tokens, attn = DinoTower(cfg).eval()(_pixels().bfloat16())
    assert tokens.dtype == torch.bfloat16 and attn.dtype == torch.float32
    assert ClipTower(cfg).eval()(_pixels().bfloat16()).dtype == torch.bfloat16


# ----------------------------------------------------------------- DINOv2 position table
def official_interpolate(pos_embed, w0, h0):
    """facebookresearch/dinov2 `interpolate_pos_encoding` (interpolate_offset=0.1,
    interpolate_antialias=False), written out: the class row is kept, the M x M patch
    rows are resized in float32 by bicubic with scale factor ((w0 + 0.1) / M, (h0 + 0.1) / M)."""
    previous_dtype = pos_embed.dtype
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    if n == w0 * h0 and w0 == h0:
        return pos_embed
    pos = pos_embed.float()
    class_pos, patch_pos = pos[:, :1], pos[:, 1:]
    dim = pos.shape[-1]
    patch_pos = F.interpolate(patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2),
                              scale_factor=((w0 + 0.1) / m, (h0 + 0.1) / m), mode="bicubic",
                              antialias=False)
    assert (w0, h0) == tuple(patch_pos.shape[-2:])
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((class_pos, patch_pos), dim=1).to(previous_dtype)


def official_forward(sd, x, num_heads, eps=1e-6):
    """The official DINOv2 forward from its own state dict, the table interpolated on the
    fly: patch conv, class token, + position table, pre-norm blocks with LayerScale.
    Returns the last block's output (before the final norm) and its softmax attention."""
    dim, patch = sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = torch.cat((sd["cls_token"].expand(x.shape[0], -1, -1), t.flatten(2).transpose(1, 2)), 1)
    t = t + official_interpolate(sd["pos_embed"], x.shape[-2] // patch, x.shape[-1] // patch)
    hd = dim // num_heads
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        def w(name):
            return sd[f"blocks.{i}.{name}"]
        h = F.layer_norm(t, (dim,), w("norm1.weight"), w("norm1.bias"), eps)
        qkv = F.linear(h, w("attn.qkv.weight"), w("attn.qkv.bias"))
        q, k, v = qkv.unflatten(-1, (3, num_heads, hd)).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2) * hd ** -0.5).softmax(-1)
        o = (attn @ v).transpose(1, 2).flatten(2)
        t = t + w("ls1.gamma") * F.linear(o, w("attn.proj.weight"), w("attn.proj.bias"))
        h = F.layer_norm(t, (dim,), w("norm2.weight"), w("norm2.bias"), eps)
        h = F.gelu(F.linear(h, w("mlp.fc1.weight"), w("mlp.fc1.bias")))
        t = t + w("ls2.gamma") * F.linear(h, w("mlp.fc2.weight"), w("mlp.fc2.bias"))
    return t, attn


def _table(tower):
    m = tower.model
    return m.pos_embed if tower.backend == "timm" else m.embeddings.position_embeddings


def _native70(**kw):
    """Tiny towers whose native grid (70 px, 5x5) differs from the input grid (56 px, 4x4)."""
    cfg = _cfg(**kw)
    cfg.dino.native_image_size = 70
    return cfg


def test_resample_is_the_official_formula_at_the_paper_grid():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1, 1 + 37 * 37, 32, generator=g) * 0.02  # 518 px -> 336 px
    out = resample_dinov2_pos_embed(table, 24)
    assert out.shape == (1, 1 + 24 * 24, 32)
    torch.testing.assert_close(out, official_interpolate(table, 24, 24), atol=0, rtol=0)
    torch.testing.assert_close(out[:, :1], table[:, :1], atol=0, rtol=0)
    bf16 = table.bfloat16()
    assert resample_dinov2_pos_embed(bf16, 24).dtype == torch.bfloat16
    torch.testing.assert_close(resample_dinov2_pos_embed(bf16, 24), official_interpolate(bf16, 24, 24),
                               atol=0, rtol=0)
    assert resample_dinov2_pos_embed(table, 37) is table  # already at the grid, as upstream
    # The libraries' own resamples are measurably different (what the formula replaces).
    patch = table[:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2)
    for kw in (dict(size=(24, 24)), dict(size=(24, 24), antialias=True)):
        lib = F.interpolate(patch, mode="bicubic", **kw).permute(0, 2, 3, 1).reshape(1, -1, 32)
        assert (lib - out[:, 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["transformers", "timm"])
def test_official_checkpoint_matches_the_official_forward(tmp_path, backend):
    ckpt = tmp_path / "dinov2_vitl14_pretrain.pth"
    sd = _official_layout_checkpoint(ckpt, grid=5)
    cfg = _native70(dino_backend=backend)
    cfg.dino.path = str(ckpt)
    tower = DinoTower(cfg).eval()
    torch.testing.assert_close(_table(tower), official_interpolate(sd["pos_embed"], 4, 4),
                               atol=1e-6, rtol=0)
    x = _pixels()
    with torch.no_grad():
        tokens, attn = tower(x)
        ref_out, ref_attn = official_forward(sd, x, cfg.dino.num_heads)
    torch.testing.assert_close(tokens, ref_out[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn, ref_attn, atol=1e-5, rtol=1e-5)
    cfg.dtype = "bfloat16"  # interpolated from the table's bf16 value, as a cast official model
    assert torch.equal(_table(DinoTower(cfg)), official_interpolate(sd["pos_embed"].bfloat16(), 4, 4))


def test_random_init_towers_are_the_native_random_model_with_the_official_table():
    from timm.models.vision_transformer import VisionTransformer
    from transformers import Dinov2Config, Dinov2Model

    for backend in ("transformers", "timm"):
        cfg = _native70(dino_backend=backend)
        torch.manual_seed(0)
        tower = DinoTower(cfg)
        torch.manual_seed(0)
        if backend == "timm":
            native = VisionTransformer(**timm_dino_kwargs(cfg, 70))
        else:
            hf = tower.model.config
            native = Dinov2Model(Dinov2Config(
                hidden_size=hf.hidden_size, num_hidden_layers=hf.num_hidden_layers,
                num_attention_heads=hf.num_attention_heads, mlp_ratio=hf.mlp_ratio, image_size=70,
                patch_size=hf.patch_size, layer_norm_eps=hf.layer_norm_eps,
                layerscale_value=hf.layerscale_value, qkv_bias=True, hidden_act="gelu"))
        want, got = native.state_dict(), tower.model.state_dict()
        assert want.keys() == got.keys()
        for k, v in want.items():
            if v.shape[1:2] == (26,):  # the 1 + 5x5 table
                assert got[k].shape == (1, 17, 64)
                v = official_interpolate(v, 4, 4)
            torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0, msg=f"{backend} {k}")


def test_transformers_directory_at_its_native_grid_is_resampled(tmp_path):
    """A Dinov2Model directory at 70 px saved with the legacy key names that
    facebook/dinov2-* on the hub still use (attention.attention.query, ...)."""
    from safetensors.torch import load_file, save_file
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    native = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      mlp_ratio=4, image_size=70, patch_size=14,
                                      layer_norm_eps=1e-6, layerscale_value=0.5))
    native.save_pretrained(tmp_path / "dino")
    legacy = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
              "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense"}
    weights = load_file(tmp_path / "dino" / "model.safetensors")
    renamed = {}
    for k, v in weights.items():
        for new, old in legacy.items():
            k = k.replace(new, old)
        renamed[k] = v
    assert any("attention.attention.query" in k for k in renamed)
    save_file(renamed, tmp_path / "dino" / "model.safetensors", metadata={"format": "pt"})
    cfg = _native70()
    cfg.dino.path = str(tmp_path / "dino")
    tower = DinoTower(cfg)
    torch.testing.assert_close(_table(tower), official_interpolate(native.embeddings.position_embeddings, 4, 4),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(tower.model.encoder.layer[1].attention.q_proj.weight,
                               native.encoder.layer[1].attention.q_proj.weight, atol=0, rtol=0)
    assert tower.model.config.image_size == 56


@pytest.mark.parametrize("backend", ["transformers", "timm"])
def test_official_checkpoint_errors_name_the_field(tmp_path, backend):
    ckpt = tmp_path / "dinov2_vitl14_pretrain.pth"
    sd = _official_layout_checkpoint(ckpt, dim=32, mlp=128)
    cfg = _cfg(dino_backend=backend)
    cfg.dino.path = str(ckpt)
    with pytest.raises(ConfigError, match=r"dino.hidden_size=64 .*has 32"):
        DinoTower(cfg)
    sd = _official_layout_checkpoint(ckpt)
    sd["register_tokens"] = torch.zeros(1, 4, 64)
    torch.save(sd, ckpt)
    with pytest.raises(ConfigError, match="register tokens"):
        DinoTower(cfg)
    cfg.dino.path = str(tmp_path / "absent.pth")
    with pytest.raises(ConfigError, match="absent.pth"):
        DinoTower(cfg)
