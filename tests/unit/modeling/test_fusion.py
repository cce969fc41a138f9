"""Forgery-aware fusion against a direct computation of the fusion math (docs/architecture.md, section 4)."""
import math

import pytest
import torch

from modeling.fusion import REFERENCE_NAMES, ForgeryAwareFusion
from modeling.projector import build_projector

torch.set_num_threads(1)
B, N, D, H, HD = 2, 9, 32, 4, 4  # 3x3 token grid, width 32, 4 fusion heads, 4 DINO heads


def _inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    clip = torch.randn(B, N, D, generator=g).to(dtype)
    dino = torch.randn(B, N, D, generator=g).to(dtype)
    attn = torch.randn(B, HD, N + 1, N + 1, generator=g).softmax(-1)
    return clip, dino, attn


def _fixed(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def _layer_norm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _direct(m, clip, dino, attn):
    """The fusion math, written out: drop CLS row/col, log(A + 1e-6), 1x1 conv
    (heads -> 2 heads), GELU, 1x1 conv (-> heads) as per-head bias of the scaled QK^T of
    a cross-attention (CLIP queries, DINO keys/values), post-norm residual, 4x ReLU FFN,
    post-norm residual."""
    a = torch.log(attn[:, :, 1:, 1:] + 1e-6)
    c1w, c1b = m.bias_net[0].weight[:, :, 0, 0], m.bias_net[0].bias
    c2w, c2b = m.bias_net[2].weight[:, :, 0, 0], m.bias_net[2].bias
    h = torch.einsum("oc,bcij->boij", c1w, a) + c1b[None, :, None, None]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    bias = torch.einsum("oc,bcij->boij", c2w, h) + c2b[None, :, None, None]
    dh = D // H

    def heads(x):
        return x.view(B, N, H, dh).permute(0, 2, 1, 3)

    q = heads(clip @ m.q_proj.weight.T + m.q_proj.bias)
    k = heads(dino @ m.k_proj.weight.T + m.k_proj.bias)
    v = heads(dino @ m.v_proj.weight.T + m.v_proj.bias)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh) + bias, dim=-1)
    att = (w @ v).permute(0, 2, 1, 3).reshape(B, N, D)
    att = att @ m.out_proj.weight.T + m.out_proj.bias
    x = _layer_norm(clip + att, m.attn_norm.weight, m.attn_norm.bias)
    f = torch.relu(x @ m.ffn_up.weight.T + m.ffn_up.bias) @ m.ffn_down.weight.T + m.ffn_down.bias
    return _layer_norm(x + f, m.ffn_norm.weight, m.ffn_norm.bias)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_fusion_matches_design_math(impl):
    m = _fixed(ForgeryAwareFusion(D, H, HD, dropout=0.1, attn_implementation=impl)).eval()
    clip, dino, attn = _inputs()
    got = m(clip, dino, attn)
    assert got.shape == (B, N, D) and got.dtype == torch.float32
    torch.testing.assert_close(got, _direct(m, clip, dino, attn), atol=1e-5, rtol=1e-5)


def test_fusion_bias_changes_the_output():
    m = _fixed(ForgeryAwareFusion(D, H, HD)).eval()
    clip, dino, attn = _inputs()
    other = torch.randn_like(attn).softmax(-1)
    assert not torch.allclose(m(clip, dino, attn), m(clip, dino, other))


def test_fusion_dropout_only_in_training():
    m = _fixed(ForgeryAwareFusion(D, H, HD, dropout=0.5))
    clip, dino, attn = _inputs()
    m.eval()
    assert torch.equal(m(clip, dino, attn), m(clip, dino, attn))
    m.train()
    torch.manual_seed(0)
    a = m(clip, dino, attn)
    torch.manual_seed(1)
    assert not torch.allclose(a, m(clip, dino, attn))


def test_fusion_gradients_reach_every_parameter():
    m = ForgeryAwareFusion(D, H, HD).train()
    clip, dino, attn = _inputs()
    clip.requires_grad_(True)
    m(clip, dino, attn).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert clip.grad is not None


def test_fusion_bf16():
    m = ForgeryAwareFusion(D, H, HD).to(torch.bfloat16).eval()
    clip, dino, attn = _inputs(dtype=torch.bfloat16)
    out = m(clip, dino, attn)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_fusion_rejects_unequal_grids():
    m = ForgeryAwareFusion(D, H, HD)
    clip, dino, attn = _inputs()
    with pytest.raises(ValueError, match="equal token grids"):
        m(clip[:, :4], dino, attn)


def test_reference_names_cover_the_module_one_to_one():
    m = ForgeryAwareFusion(D, H, HD)
    ours = {n.rsplit(".", 1)[0] for n, _ in m.named_parameters()}
    assert set(REFERENCE_NAMES.values()) == ours
    assert len(set(REFERENCE_NAMES)) == len(REFERENCE_NAMES.values())
    assert m.bias_net[0].weight.shape == (2 * HD, HD, 1, 1)
    assert m.bias_net[2].weight.shape == (H, 2 * HD, 1, 1)
    assert m.ffn_up.weight.shape == (4 * D, D)


def test_projector_mlp2x_gelu():
    p = build_projector("mlp2x_gelu", 24, D)
    assert [type(x).__name__ for x in p] == ["Linear", "GELU", "Linear"]
    x = torch.randn(B, N, 24)
    torch.testing.assert_close(p(x), p[2](torch.nn.functional.gelu(p[0](x))))
    assert p(x).shape == (B, N, D)
