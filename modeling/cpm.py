"""Classification Probability Mapper: the math, separate from the model so it can be
checked by hand.

At the position whose next token is the decision word after
"<CONCLUSION> This image is", the LLM's logits of the "real" and "fake" tokens
are divided by a temperature, soft-maxed, and scored with cross-entropy against
the image label (0 real, 1 fake). p_fake is the softmax's second entry.

Locating that position must not depend on the whitespace after the tag: the
real MMFR answers write "<CONCLUSION> This image is fake." (the reference's
hard-coded ids spell the space), a minority of records write no space, a newline
or several, and every one of those tokenises differently ("▁This" / "This" /
"<0x0A>" "This" for a SentencePiece LLaMA tokenizer, "ĠThis" / "This" for a
byte-level BPE). So no fixed token pattern is matched: the candidates are the
supervised real/fake tokens, and a candidate is accepted when the text its
preceding tokens decode to ends with the prefix, whitespace-insensitively
(`prefix_regex`).
"""
from __future__ import annotations

import collections
import re

import torch
import torch.nn.functional as F

from modeling.template import IGNORE_INDEX

# Tokens decoded before a candidate beyond the prefix's own length: room for
# whitespace runs (each space or newline may be a token of its own).
_WINDOW_SLACK = 16


def prefix_regex(prefix: str) -> re.Pattern:
    r"""The prefix as a pattern that allows any whitespace around tags and any run of
    whitespace between words: "<CONCLUSION> This image is" matches
    "<CONCLUSION>This image is", "<CONCLUSION>\n  This  image\tis", and so on
    (case-insensitively; the decision word itself is matched by token id)."""
    # Tags are pieces of their own even when written against a word ("<CONCLUSION>This").
    words = re.findall(r"<[^<>]+>|[^\s<>]+|[<>]", prefix)
    if not words:
        raise ValueError("the CPM prefix is empty")
    parts = [re.escape(words[0])]
    for prev, word in zip(words, words[1:]):
        # Between a tag and a word whitespace is optional; between two words it is not.
        sep = r"\s*" if prev.endswith(">") or word.startswith("<") else r"\s+"
        parts += [sep, re.escape(word)]
    return re.compile("".join(parts), flags=re.IGNORECASE)


def last_prefix_end(text: str, prefix: str) -> int:
    """Index just after the last occurrence of the prefix in `text` (any whitespace),
    or -1 when there is none."""
    end = -1
    for m in prefix_regex(prefix).finditer(text):
        end = m.end()
    return end


def prefix_spellings(answers, prefix: str) -> "collections.Counter[str]":
    """How the answers spell the prefix: the exact text of the last match of
    `prefix_regex(prefix)` followed by "real"/"fake" in each answer, counted."""
    pattern = re.compile(f"({prefix_regex(prefix).pattern})\\s*(?:real|fake)\\b", flags=re.IGNORECASE)
    counts: collections.Counter[str] = collections.Counter()
    for text in answers:
        matches = pattern.findall(text)
        if matches:
            counts[matches[-1]] += 1
    return counts


class DecisionLocator:
    """Finds the CPM position in token ids: the last t such that ids[t+1] is a
    decision token, is supervised, and the tokens before it decode to text ending
    with the prefix (plus optional whitespace).

    tokenizer: any transformers tokenizer (decode is the only call made);
    prefix: the conclusion text before the decision word, e.g. "<CONCLUSION> This image is";
    decision_tokens: the ids that can carry the decision there (modeling.tokenization.tokenizer.cpm_decision_tokens);
    prefix_len: the prefix's length in tokens (the window decoded is this plus a slack).
    """

    def __init__(self, tokenizer, prefix: str, decision_tokens, prefix_len: int):
        self.tokenizer = tokenizer
        self.decision_tokens = frozenset(int(t) for t in decision_tokens)
        self.window = int(prefix_len) + _WINDOW_SLACK
        self._ends_with_prefix = re.compile(f"(?:{prefix_regex(prefix).pattern})\\s*$", flags=re.IGNORECASE)

    def _accepts(self, ids: list[int]) -> bool:
        text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return self._ends_with_prefix.search(text) is not None

    def row_position(self, row: list[int]) -> int:
        """Position in one row of labels (IGNORE_INDEX outside the answer), -1 if none."""
        for t in range(len(row) - 2, -1, -1):
            if row[t + 1] not in self.decision_tokens:
                continue
            ctx = [x for x in row[max(0, t + 1 - self.window): t + 1] if x >= 0]
            if self._accepts(ctx):
                return t
        return -1

    def positions(self, labels: torch.Tensor) -> torch.Tensor:
        """[B, T] labels -> [B] long positions (-1 where a row has none, e.g. a
        truncated answer). The decision token must be supervised; the context
        may include prompt tokens (as ignored labels they are skipped).

        The candidates are found on the labels' device; only rows that have one
        are copied to the host, and only their candidates' windows are decoded."""
        labels = labels.detach()
        ids = torch.tensor(sorted(self.decision_tokens), dtype=labels.dtype, device=labels.device)
        rows_with = torch.isin(labels[:, 1:], ids).any(dim=1).nonzero().flatten().tolist()
        out = [-1] * labels.shape[0]
        for b, row in zip(rows_with, labels[rows_with].cpu().tolist()):
            out[b] = self.row_position(row)
        return torch.tensor(out, dtype=torch.long, device=labels.device)


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
