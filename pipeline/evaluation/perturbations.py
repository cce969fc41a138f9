"""Robustness sweeps: deterministic perturbations of the decoded image.

A sweep (``--perturb jpeg:95,75,50 --perturb resize:0.5 --perturb blur:1.0``)
scores the same images once clean and once under each perturbation. The loader
workers decode each image once and apply every perturbation to that decoded
``PIL.Image`` before the model's preprocessing (data.EvalImages), so a sweep of
P perturbations reads the shards once and costs P more generations, no extra
disk pass. Each perturbation is a pure function of the image:

- ``jpeg:Q`` re-encodes as baseline JPEG at quality Q (integer 1..100) with
  4:2:0 chroma subsampling and no optimisation pass (Pillow/libjpeg, fixed
  settings, so the same bytes every run), then decodes back to RGB;
- ``resize:F`` scales both sides by F (0 < F <= 1, rounded, at least 1 px)
  (half up) with Pillow's BICUBIC filter, down only: the image processor then brings the
  smaller image to the model's input size like any other input, so the sweep
  measures loss of resolution as a real low-resolution upload would have it
  (a down-and-back-up step would add a second, arbitrary resampling);
- ``blur:R`` applies Pillow's GaussianBlur with radius R (> 0, in pixels of
  the decoded image).

Perturbed predictions go to ``predictions_perturbed.jsonl`` (one row per
image and perturbation, field ``perturbation`` = its name, e.g. ``jpeg:75``);
``predictions.jsonl`` and the main tables stay the clean run. results.json
"robustness" and results.md hold one table per perturbation kind whose row 0
is the clean run, then one row per strength in the order given.
"""
from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageFilter

KINDS: tuple[str, ...] = ("jpeg", "resize", "blur")
CLEAN = "clean"
# What each kind's strength means (errors and the report's column header).
STRENGTH_NAMES = {"jpeg": "JPEG quality", "resize": "scale factor", "blur": "blur radius (px)"}


class PerturbationError(ValueError):
    """A perturbation spec that cannot be parsed; the message shows the spec."""


@dataclass(frozen=True)
class Perturbation:
    """One perturbation at one strength (see the module doc for what each does)."""

    kind: str
    strength: float

    @property
    def name(self) -> str:
        """`kind:strength` as the user writes it (jpeg:75, resize:0.5, blur:1)."""
        s = int(self.strength) if float(self.strength).is_integer() else self.strength
        return f"{self.kind}:{s}"

    def apply(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        if self.kind == "jpeg":
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=int(self.strength), subsampling="4:2:0", optimize=False)
            buf.seek(0)
            with Image.open(buf) as out:
                return out.convert("RGB")
        if self.kind == "resize":
            w, h = image.size
            size = (max(1, int(w * self.strength + 0.5)), max(1, int(h * self.strength + 0.5)))
            return image.resize(size, Image.Resampling.BICUBIC)
        return image.filter(ImageFilter.GaussianBlur(radius=self.strength))


def _check(kind: str, value: float, spec: str) -> None:
    if kind == "jpeg" and not (value.is_integer() and 1 <= value <= 100):
        raise PerturbationError(f"{spec!r}: JPEG quality must be an integer in 1..100, got {value:g}")
    if kind == "resize" and not 0 < value <= 1:
        raise PerturbationError(f"{spec!r}: resize factor must be in (0, 1] (down-scaling only), got {value:g}")
    if kind == "blur" and not value > 0:
        raise PerturbationError(f"{spec!r}: blur radius must be > 0, got {value:g}")


def parse_perturbation(spec: str) -> list[Perturbation]:
    """`kind:s1,s2,...` -> one Perturbation per strength, in the order written."""
    kind, sep, values = spec.strip().partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in KINDS or not values.strip():
        raise PerturbationError(f"{spec!r}: expected KIND:STRENGTH[,STRENGTH...] with KIND one of "
                                f"{', '.join(KINDS)} (e.g. jpeg:95,75,50, resize:0.5, blur:1.0)")
    out = []
    for text in values.split(","):
        try:
            value = float(text)
        except ValueError:
            raise PerturbationError(f"{spec!r}: strength {text.strip()!r} is not a number") from None
        _check(kind, value, spec)
        out.append(Perturbation(kind, value))
    return out


def parse_perturbations(specs: Iterable[str]) -> list[Perturbation]:
    """Every spec expanded; a perturbation given twice is an error (it would be scored twice)."""
    out: list[Perturbation] = []
    for spec in specs:
        for p in parse_perturbation(spec):
            if p in out:
                raise PerturbationError(f"{spec!r}: {p.name} is given twice")
            out.append(p)
    return out


def by_kind(perturbations: Sequence[Perturbation]) -> dict[str, list[Perturbation]]:
    """kind -> its perturbations, kinds and strengths in the order given."""
    out: dict[str, list[Perturbation]] = {}
    for p in perturbations:
        out.setdefault(p.kind, []).append(p)
    return out


# Metrics of a sweep row: (key in the set's "average", header, format kind).
SWEEP_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("n", "N", "int"),
    ("acc", "Acc", "pct"),
    ("acc_strict", "Acc (strict)", "pct"),
    ("cpm_acc", "CPM Acc", "pct"),
    ("auc", "AUC", "frac"),
    ("ap", "AP", "frac"),
    ("ece", "ECE", "frac"),
)
