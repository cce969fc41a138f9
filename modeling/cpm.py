"""Classification Probability Mapper: the math, separate from the model so it can be
checked by hand.

At the position whose next token is the decision word after
"<CONCLUSION>This image is", the LLM's logits of the "real" and "fake" tokens
are divided by a temperature, soft-maxed, and scored with cross-entropy against
the image label (0 real, 1 fake). p_fake is the softmax's second entry.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def find_positions_in_labels(labels: torch.Tensor, pattern: list[int], real_id: int,
                             fake_id: int) -> torch.Tensor:
    """Per row, the last position t such that labels[t+1] is the real or fake id and
    labels[t+1-len(pattern) : t+1] == pattern (the tokens of "...This image is").
    Returns [B] long, -1 where the row has no such place (e.g. truncated answer)."""
    b, t = labels.shape
    nxt = labels[:, 1:]
    hit = (nxt == real_id) | (nxt == fake_id)  # candidate t in [0, T-1)
    k = len(pattern)
    if k:
        pat = torch.as_tensor(pattern, device=labels.device, dtype=labels.dtype)
        ok = torch.zeros_like(hit)
        if t - 1 >= k:
            # window ending at t (inclusive): labels[t-k+1 .. t]
            win = labels.unfold(1, k, 1)  # [B, T-k+1, k], window i covers i..i+k-1
            match = (win == pat).all(-1)  # match[i] -> window ends at i+k-1
            ok[:, k - 1:] = match[:, : t - 1 - (k - 1)]
        hit = hit & ok
    idx = torch.arange(t - 1, device=labels.device).expand(b, -1)
    last = torch.where(hit, idx, torch.full_like(idx, -1)).max(dim=1).values
    return last


def find_positions_by_argmax(logits: torch.Tensor, labels: torch.Tensor, real_id: int,
                             fake_id: int) -> torch.Tensor:
    """The reference's matching: among positions whose next label is supervised,
    the last one where the model's argmax prediction is the real or fake token.
    [B] long, -1 where the prediction never is."""
    pred = logits.argmax(dim=-1)[:, :-1]
    supervised = labels[:, 1:] != IGNORE_INDEX
    hit = ((pred == real_id) | (pred == fake_id)) & supervised
    idx = torch.arange(hit.shape[1], device=logits.device).expand(hit.shape[0], -1)
    return torch.where(hit, idx, torch.full_like(idx, -1)).max(dim=1).values


def gather_pair_logits(logits: torch.Tensor, positions: torch.Tensor, real_id: int,
                       fake_id: int) -> torch.Tensor:
    """[B, T, V] logits and [B] positions (-1 allowed) -> [B, 2] (real, fake) logits, float32."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    at = logits[rows, positions.clamp(min=0)]  # [B, V]
    return torch.stack([at[:, real_id], at[:, fake_id]], dim=-1).float()


def cpm_from_pair_logits(pair: torch.Tensor, forgery_labels: torch.Tensor | None,
                         temperature: float, valid: torch.Tensor | None = None):
    """pair [B, 2] (real, fake) logits -> (loss, p_fake [B], correct [B]).

    loss is the mean cross-entropy over valid rows (0 when none is valid, still
    attached to the graph); p_fake is NaN and correct False on invalid rows."""
    b = pair.shape[0]
    if valid is None:
        valid = torch.ones(b, dtype=torch.bool, device=pair.device)
    scaled = pair / temperature
    p_fake = scaled.softmax(dim=-1)[:, 1]
    p_fake = torch.where(valid, p_fake, torch.full_like(p_fake, float("nan")))
    if forgery_labels is None:
        return None, p_fake, None
    target = forgery_labels.to(device=pair.device, dtype=torch.long)
    ce = F.cross_entropy(scaled, target.clamp(0, 1), reduction="none")
    n = valid.sum()
    loss = (ce * valid).sum() / n.clamp(min=1)
    correct = valid & ((p_fake > 0.5).long() == target)
    return loss, p_fake, correct
