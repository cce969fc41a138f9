"""Forgery-aware fusion module (docs/architecture.md, section 4).

CLIP tokens (queries) attend to DINO tokens (keys/values) in one
cross-attention layer whose per-head scores get an additive bias computed from
DINOv2's last-block attention map: drop the CLS row and column, log(A + eps),
1x1 conv (dino heads -> 2 x dino heads), GELU, 1x1 conv (-> fusion heads).
Then a post-norm residual, a 4x ReLU FFN and a second post-norm residual.

Submodules map 1:1 onto the reference (MCAN-style) names, see REFERENCE_NAMES.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# reference key prefix (under `model.crossattention.`) -> our submodule prefix.
# The reference LayerNorm stores weight/bias as a_2/b_2.
REFERENCE_NAMES: dict[str, str] = {
    "attention_mlp.mlp.0": "bias_net.0",
    "attention_mlp.mlp.2": "bias_net.2",
    "mhatt.0.linear_q": "q_proj",
    "mhatt.0.linear_k": "k_proj",
    "mhatt.0.linear_v": "v_proj",
    "mhatt.0.linear_merge": "out_proj",
    "ffn.0.mlp.fc.linear": "ffn_up",
    "ffn.0.mlp.linear": "ffn_down",
    "norm.0": "attn_norm",
    "norm.1": "ffn_norm",
}


class ForgeryAwareFusion(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, dino_heads: int, dropout: float = 0.1,
                 ffn_mult: int = 4, norm_eps: float = 1e-6, log_eps: float = 1e-6,
                 attn_implementation: str = "sdpa"):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"fusion width {hidden_size} not divisible by {num_heads} heads")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.log_eps = log_eps
        self.attn_implementation = attn_implementation
        self.bias_net = nn.Sequential(
            nn.Conv2d(dino_heads, 2 * dino_heads, kernel_size=1),
            nn.GELU(),
            nn.Conv2d(2 * dino_heads, num_heads, kernel_size=1),
        )
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.attn_norm = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.ffn_up = nn.Linear(hidden_size, ffn_mult * hidden_size)
        self.ffn_down = nn.Linear(ffn_mult * hidden_size, hidden_size)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.dropout = nn.Dropout(dropout)

    def attention_bias(self, dino_attn: torch.Tensor) -> torch.Tensor:
        """[B, Hd, 1+N, 1+N] softmax map -> per-head additive bias [B, H, N, N]."""
        a = dino_attn[:, :, 1:, 1:].float()
        x = torch.log(a + self.log_eps).to(self.bias_net[0].weight.dtype)
        return self.bias_net(x)

    def forward(self, clip_tokens: torch.Tensor, dino_tokens: torch.Tensor,
                dino_attn: torch.Tensor) -> torch.Tensor:
        """clip_tokens, dino_tokens: [B, N, hidden] (projected); dino_attn: [B, Hd, 1+N, 1+N]."""
        b, n, _ = clip_tokens.shape
        if dino_attn.shape[-1] != dino_tokens.shape[1] + 1 or dino_tokens.shape[1] != n:
            raise ValueError(f"fusion needs equal token grids: CLIP {n} tokens, DINO "
                             f"{dino_tokens.shape[1]} tokens, attention map {tuple(dino_attn.shape)}")
        bias = self.attention_bias(dino_attn)
        q = self.q_proj(clip_tokens).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(dino_tokens).view(b, -1, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(dino_tokens).view(b, -1, self.num_heads, self.head_dim).transpose(1, 2)
        bias = bias.to(q.dtype)
        p = self.dropout.p if self.training else 0.0
        if self.attn_implementation == "sdpa":
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + bias
            att = torch.matmul(self.dropout(scores.softmax(dim=-1)), v)
        att = self.out_proj(att.transpose(1, 2).reshape(b, n, self.hidden_size))
        x = self.attn_norm(clip_tokens + self.dropout(att))
        ffn = self.ffn_down(self.dropout(F.relu(self.ffn_up(x))))
        return self.ffn_norm(x + self.dropout(ffn))
