"""Vision towers: CLIP layer selection, DINOv2 last-block attention (transformers and
timm), the official DINOv2 checkpoint layout through timm's filter, local HF dirs."""
import pytest
import torch

from modeling.config import ConfigError, ModelConfig
from modeling.vision import ClipTower, DinoTower, build_timm_dino

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
    from timm.layers import resample_abs_pos_embed
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
            torch.testing.assert_close(state[k], resample_abs_pos_embed(v, (4, 4), (5, 5),
                                                                        num_prefix_tokens=1))
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
