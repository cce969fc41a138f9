"""FDR metrics (docs/architecture.md, section 5): detection accuracy in two conventions, text
metrics of the generated reasoning, and AUC/AP of the CPM probability.

Every function here is pure (lists of floats or prediction rows in, numbers
out) except ``CSSScorer``, which holds the CLIP text model. The text metrics
call the libraries the paper used instead of re-implementing them, so that
numbers agree with them to the last digit:

- BLEU-1: ``nltk sentence_bleu([ref.split()], hyp.split(), weights=(1,0,0,0))``.
  An empty hypothesis (or reference) scores 0.0: that is what NLTK returns.
- ROUGE-L: ``rouge_score RougeScorer(['rougeL'], use_stemmer=True)`` F-measure.
- CSS: cosine similarity of CLIP text embeddings (projected, as
  ``CLIPTextModelWithProjection.text_embeds``) of hypothesis and reference,
  texts truncated to the model's context (77 tokens for CLIP). An empty
  hypothesis scores 0.0 instead of the similarity of the empty string's
  embedding, which is not a measure of anything the model said; the
  reference protocol (``CSSScorer(embed_empty=True)``) scores it as the
  reference does, with the CLIP embedding of "" like any other text.

Text metrics are only defined for images that have a reference reasoning
(a non-empty ``reference``); detection-only benchmarks get ``None``.

Conventions (both are always reported):
- ``reference``: unparseable answers are left out of every metric but the
  parse-failure rate, as the reference implementation does (silently);
- ``strict``: unparseable answers count as wrong decisions, and their
  reasoning (possibly empty) is scored like any other.
AUC and AP use ``p_fake`` of every image, parseable or not, and so do the
calibration metrics ECE (15 equal-width bins), NLL and Brier (calibration.py).
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nltk.translate.bleu_score import sentence_bleu
from rouge_score import rouge_scorer

# These metrics as a Hugging Face `evaluate` module (package data, so an installed
# package has it too): `evaluate.load(FDR_METRIC_DIR)`.
FDR_METRIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fdr_metric")
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.evaluation.calibration import brier, ece, nll
from pipeline.evaluation.parsing import PARSEABLE_STATUSES
from sharding.schema import GENERATORS

_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

# Metric names in the order they appear in tables and results.json.
ACCURACY_METRICS = ("real_acc", "fake_acc", "acc")
TEXT_METRICS = ("bleu1", "rouge_l", "css")
# Calibration of p_fake (pipeline/evaluation/calibration.py for the definitions).
CALIBRATION_METRICS = ("ece", "nll", "brier")
STRICT_SUFFIX = "_strict"


def bleu1(reference: str, hypothesis: str) -> float:
    """NLTK sentence BLEU with weights (1,0,0,0) on whitespace tokens."""
    with warnings.catch_warnings():
        # NLTK warns about zero higher-order n-gram counts even though their
        # weight is 0; the warning is irrelevant for BLEU-1 and floods logs.
        warnings.simplefilter("ignore")
        return float(sentence_bleu([reference.split()], hypothesis.split(), weights=(1, 0, 0, 0)))


MAX_TEXT_METRIC_CHARS = 20_000
"""Characters of a reference or answer that ROUGE-L scores: its LCS table is
len(reference) x len(answer) tokens in pure Python, so an unbounded reference in
a shard could stall the evaluation. MMFR references and 512-token answers are a
few thousand characters, far below it; beyond it the text is not scored."""


def rouge_l(reference: str, hypothesis: str) -> float:
    """rouge-score ROUGE-L F-measure with the Porter stemmer (on the first
    MAX_TEXT_METRIC_CHARS characters of each text)."""
    cut = MAX_TEXT_METRIC_CHARS
    return float(_ROUGE.score(reference[:cut], hypothesis[:cut])["rougeL"].fmeasure)


class CSSScorer:
    """Cosine similarity of CLIP text embeddings, with the model loaded once.

    The reference reloads the CLIP text model for every sample; loading it once
    per process and embedding in batches is what makes evaluation of 20K
    images cheap. ``path`` is a local directory holding a transformers CLIP
    checkpoint (a full ``CLIPModel`` or a ``CLIPTextModelWithProjection``) and
    its tokenizer; nothing is fetched from the network.
    """

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 64, embed_empty: bool = False) -> None:
        """embed_empty: score an empty hypothesis with the embedding of "" (the
        reference's behaviour) instead of 0.0."""
        import os

        import torch
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        if not os.path.isdir(path):
            raise FileNotFoundError(f"CSS: CLIP text model directory {path!r} does not exist")
        self.torch = torch
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.embed_empty = embed_empty
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = CLIPTextModelWithProjection.from_pretrained(path, local_files_only=True)
        self.model.to(self.device).eval()
        limit = int(self.model.config.max_position_embeddings)
        tok_limit = getattr(self.tokenizer, "model_max_length", limit) or limit
        self.max_length = min(limit, int(tok_limit))

    def embed(self, texts: Sequence[str]):
        """L2-normalised text embeddings, float32 on CPU, shape [len(texts), D]."""
        torch = self.torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                chunk = list(texts[i : i + self.batch_size])
                enc = self.tokenizer(
                    chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                )
                enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                emb = self.model(**enc).text_embeds.float()
                out.append(torch.nn.functional.normalize(emb, dim=-1).cpu())
        if not out:
            return torch.zeros(0, int(self.model.config.projection_dim))
        return torch.cat(out)

    def score(self, references: Sequence[str], hypotheses: Sequence[str]) -> list[float]:
        """CSS of each (reference, hypothesis) pair; 0.0 where the hypothesis is empty
        (unless embed_empty: then its text, "" or blanks, is embedded like any other)."""
        if len(references) != len(hypotheses):
            raise ValueError(f"CSS: {len(references)} references but {len(hypotheses)} hypotheses")
        pairs = [(r, h) for r, h in zip(references, hypotheses) if self.embed_empty or h.strip()]
        # Embed each distinct text once: references repeat across answers of
        # the same image set and hypotheses are often identical.
        unique = sorted({t for pair in pairs for t in pair})
        index = {t: i for i, t in enumerate(unique)}
        emb = self.embed(unique)
        scores = []
        for r, h in zip(references, hypotheses):
            if not h.strip() and not self.embed_empty:
                scores.append(0.0)
            else:
                scores.append(float((emb[index[r]] * emb[index[h]]).sum()))
        return scores


def text_scores(
    references: Sequence[str], hypotheses: Sequence[str], css: CSSScorer | None = None
) -> list[dict[str, float | None]]:
    """Per-image ``bleu1``, ``rouge_l`` and ``css`` (None without a CSS model,
    and all None where the reference is empty: no reasoning to compare with)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    css_values: list[float | None] = [None] * len(references)
    idx = [i for i, r in enumerate(references) if r]
    if css is not None and idx:
        for i, v in zip(idx, css.score([references[i] for i in idx], [hypotheses[i] for i in idx])):
            css_values[i] = v
    out = []
    for i, (r, h) in enumerate(zip(references, hypotheses)):
        if not r:
            out.append({"bleu1": None, "rouge_l": None, "css": None})
        else:
            out.append({"bleu1": bleu1(r, h), "rouge_l": rouge_l(r, h), "css": css_values[i]})
    return out


def auc_ap(labels: Sequence[int], p_fake: Sequence[float]) -> tuple[float | None, float | None]:
    """ROC AUC and average precision (fake = positive); None when one class is missing."""
    if len(set(labels)) < 2:
        return None, None
    return float(roc_auc_score(labels, p_fake)), float(average_precision_score(labels, p_fake))


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return math.fsum(values) / len(values) if values else None


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


@dataclass(frozen=True)
class _Row:
    label: int
    pred: int | None
    parseable: bool
    p_fake: float | None
    has_reference: bool
    text: dict[str, float | None]


def _rows(predictions: Iterable[Mapping[str, Any]]) -> list[_Row]:
    rows = []
    for p in predictions:
        parseable = p["parse_status"] in PARSEABLE_STATUSES
        if parseable != (p["pred"] is not None):
            raise ValueError(f"prediction {p.get('key')!r}: parse_status {p['parse_status']!r} but pred {p['pred']!r}")
        rows.append(
            _Row(
                label=int(p["label"]),
                pred=p["pred"],
                parseable=parseable,
                p_fake=p.get("p_fake"),
                has_reference=bool(p.get("reference")),
                text={m: p.get(m) for m in TEXT_METRICS},
            )
        )
    return rows


def group_metrics(predictions: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """All metrics of one group of predictions (one generator, or a pooled set).

    Each prediction is a mapping with ``label``, ``pred``, ``parse_status``,
    ``p_fake`` (or None), ``reference`` and the per-image text scores
    ``bleu1``, ``rouge_l``, ``css`` (None when not computed).
    """
    rows = _rows(predictions)
    out: dict[str, Any] = {"n": len(rows)}
    parsed = [r for r in rows if r.parseable]
    out["n_real"] = sum(r.label == 0 for r in rows)
    out["n_fake"] = sum(r.label == 1 for r in rows)
    out["n_parsed"] = len(parsed)
    out["n_unparseable"] = len(rows) - len(parsed)
    out["parse_failure_rate"] = _ratio(out["n_unparseable"], len(rows))
    for suffix, group in (("", parsed), (STRICT_SUFFIX, rows)):
        for name, label in (("real_acc", 0), ("fake_acc", 1), ("acc", None)):
            members = [r for r in group if label is None or r.label == label]
            out[name + suffix] = _ratio(sum(r.pred == r.label for r in members), len(members))
        with_ref = [r for r in group if r.has_reference]
        for m in TEXT_METRICS:
            values = [r.text[m] for r in with_ref]
            # A metric that was not computed for some image (CSS without a
            # CLIP model) is reported as missing, never averaged over a subset.
            out[m + suffix] = None if any(v is None for v in values) else _mean(values)
    out["n_text"] = sum(r.has_reference for r in rows)
    scored = [r for r in rows if r.p_fake is not None]
    out["n_p_fake"] = len(scored)
    out["auc"], out["ap"] = auc_ap([r.label for r in scored], [float(r.p_fake) for r in scored])
    # The CPM's own decision (p_fake >= 0.5), independent of whether the text parsed.
    out["cpm_acc"] = _ratio(sum((float(r.p_fake) >= 0.5) == (r.label == 1) for r in scored), len(scored))
    labels, probs = [r.label for r in scored], [float(r.p_fake) for r in scored]
    out["ece"], out["nll"], out["brier"] = ece(labels, probs), nll(labels, probs), brier(labels, probs)
    return out


# Metrics that are averaged over generators (counts are summed instead).
AVERAGED_METRICS: tuple[str, ...] = (
    *ACCURACY_METRICS,
    *TEXT_METRICS,
    *(m + STRICT_SUFFIX for m in ACCURACY_METRICS + TEXT_METRICS),
    "parse_failure_rate",
    "auc",
    "ap",
    "cpm_acc",
    *CALIBRATION_METRICS,
)
COUNT_FIELDS: tuple[str, ...] = ("n", "n_real", "n_fake", "n_parsed", "n_unparseable", "n_text", "n_p_fake")


def generator_order(names: Iterable[str]) -> list[str]:
    """schema.GENERATORS order first (the paper's row order), then others sorted."""
    names = set(names)
    known = [g for g in GENERATORS if g in names]
    return known + sorted(names - set(known))


def set_metrics(predictions: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-generator metrics of one set, their average, and the pooled numbers.

    ``average`` is the mean over generators of each metric (the paper's
    "Avg" row), skipping generators where the metric is undefined;
    ``pooled`` treats the whole set as one group (AUC over all images).
    """
    by_gen: dict[str, list[Mapping[str, Any]]] = {}
    for p in predictions:
        by_gen.setdefault(p["generator"], []).append(p)
    order = generator_order(by_gen)
    per_gen = {g: group_metrics(by_gen[g]) for g in order}
    average: dict[str, Any] = {f: sum(per_gen[g][f] for g in order) for f in COUNT_FIELDS}
    for m in AVERAGED_METRICS:
        average[m] = _mean(per_gen[g][m] for g in order if per_gen[g][m] is not None)
    pooled = group_metrics(p for g in order for p in by_gen[g])
    return {"generators": per_gen, "order": order, "average": average, "pooled": pooled}
