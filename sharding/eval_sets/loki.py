"""`loki` adapter: the image modality of LOKI (Ye et al., ICLR 2025, opendatalab/LOKI).

Layout (read from opendatalab/LOKI at 251b4f6: README.md "Data Preparation",
data_json/image/*.json, configs/tasks/image/image_tf_loki.yaml and
lm_evaluate/tasks/loki.py). SRC is the LOKI root: the repository checkout
into which the Hugging Face archive `bczhou/LOKI` media_data.zip is unzipped,
as the README asks, because the annotation paths are relative to that root:

    SRC/data_json/image/true_or_false.json   judgement items (the task config's dataset_path)
    SRC/data_json/image/multi_choice.json    multiple-choice items (optional here)
    SRC/media_data/image/<uuid>.{png,jpg,JPG}

Each file is a JSON list of items with the keys image_path, question,
answer, metric, modality ("image-text"), question_type, choices and id:

- judgement (`metric` "open-ended"): `image_path` is one path,
  `question_type` is `image_tf_image_<truth>_ask_<asked>_<subcategory>` and
  `answer` is "Yes" exactly when <truth> == <asked>. Every image is asked
  twice (is it AI-generated / is it real), so the release's 4434 items cover
  2217 images. <truth> (real/fake) is the label; `answer` is cross-checked.
- multiple choice (`metric` "multi-choice"): `image_path` is a list of two
  paths, `question_type` is `image_mc_<picked>_from_<other>_<subcategory>`
  and `answer` a letter: the image at that index is <picked>, the other one
  <other>. The release's 2634 items pair the same 2217 images, with labels
  that agree with the judgement file everywhere (checked on 251b4f6), so they
  add no image there; they are read to cross-check and for copies that have
  only this file.

The subcategory is the last `_` component of `question_type`, as LOKI's own
per-type accuracy reads it (lm_evaluate/tasks/loki.py), and each one is a
report row. In the release (image counts, fake/real): animals 284/115,
doc 175/172, medicine 200/200, object 196/58, person 120/120,
satellite 214/107, sence 128/128 ("sence", sic, is the release's scene
domain; the name is kept so that rows match LOKI's own output). 1317 fakes
and 900 reals in all. The release has no generator names for its fakes.

data_json/image/open_ended_vqa.json (UTF-16, region-level explanations of
fakes) has no real/fake judgement and is not read.

An item that is not an image judgement (other modality, unparsed
question_type, bad answer) is counted in `selection` and listed as a `file`
rejection `bad_item`; an image whose items disagree on its label or
subcategory is rejected (`label_conflict`); a listed image that is not on
disk is rejected (`missing`), like a zero-byte one. Image bytes are stored
unchanged; relpath is the item's image_path.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Any

from .common import BenchmarkScan
from .folder import add_image_file, is_image

ANNOTATION_FILES: tuple[str, ...] = ("data_json/image/true_or_false.json", "data_json/image/multi_choice.json")
_TF = re.compile(r"image_tf_image_(real|fake)_ask_(real|fake)_(\w+)")
_MC = re.compile(r"image_mc_(real|fake)_from_(real|fake)_(\w+)")
_LABEL = {"real": 0, "fake": 1}


def item_labels(item: Any) -> list[tuple[str, int, str]] | str:
    """(image path, label, subcategory) of every image one LOKI item states, or why the item is not usable."""
    if not isinstance(item, dict):
        return "not a JSON object"
    if item.get("modality") != "image-text":
        return f"modality {item.get('modality')!r} is not 'image-text'"
    qtype, answer = str(item.get("question_type", "")), str(item.get("answer", "")).strip()
    paths = item.get("image_path")
    if m := _TF.fullmatch(qtype):
        truth, asked, sub = m.groups()
        if not isinstance(paths, str) or answer.lower() not in ("yes", "no"):
            return f"judgement item needs one image_path and a Yes/No answer (got {paths!r}, {answer!r})"
        if (answer.lower() == "yes") != (truth == asked):
            return f"answer {answer!r} contradicts question_type {qtype!r}"
        return [(paths, _LABEL[truth], sub)]
    if m := _MC.fullmatch(qtype):
        picked, other, sub = m.groups()
        index = ord(answer.upper()) - ord("A") if len(answer) == 1 else -1
        if not isinstance(paths, list) or not 0 <= index < len(paths):
            return f"multiple-choice item needs a list of image_path and an answer letter (got {answer!r})"
        return [(str(p), _LABEL[picked if i == index else other], sub) for i, p in enumerate(paths)]
    return f"question_type {qtype!r} is not an image judgement or multiple-choice type"


def _read_items(path: str) -> list[Any]:
    with open(path, encoding="utf-8-sig") as fh:
        try:
            items = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of LOKI items, found {type(items).__name__}")
    return items


def scan_loki(src: str, benchmark: str, annotation_files: tuple[str, ...] = ANNOTATION_FILES) -> BenchmarkScan:
    src = os.path.abspath(src)
    files = [f for f in annotation_files if os.path.isfile(os.path.join(src, f))]
    if not files:
        raise FileNotFoundError(f"{src}: none of {list(annotation_files)} found (SRC must be the LOKI root holding "
                                "data_json/ from opendatalab/LOKI and media_data/ from its Hugging Face archive)")
    scan = BenchmarkScan(benchmark)
    stated: dict[str, set[tuple[int, str]]] = {}  # image path -> every (label, subcategory) stated for it
    items: Counter[str] = Counter()  # '<file>: read' / '<file>: bad' -> items
    for rel_file in files:
        for i, item in enumerate(_read_items(os.path.join(src, rel_file))):
            found = item_labels(item)
            if isinstance(found, str):
                items[f"{rel_file}: bad"] += 1
                scan.reject(benchmark, f"{rel_file}#{i}", "bad_item", found, kind="file")
                continue
            rels = [os.path.normpath(p).replace(os.sep, "/") for p, _, _ in found]
            if any(r.startswith("../") or os.path.isabs(r) for r in rels):
                items[f"{rel_file}: bad"] += 1
                scan.reject(benchmark, f"{rel_file}#{i}", "bad_item", f"image_path {rels} is outside SRC", kind="file")
                continue
            items[f"{rel_file}: read"] += 1
            for rel, (_, label, sub) in zip(rels, found):
                stated.setdefault(rel, set()).add((label, sub))
    for rel in sorted(stated):
        (label, sub), *others = sorted(stated[rel])
        if not is_image(scan, rel, sub):
            continue
        if others:
            scan.reject(sub, rel, "label_conflict", f"the items state {sorted(stated[rel])} (label, subcategory)")
            continue
        add_image_file(scan, os.path.join(src, *rel.split("/")), rel, sub, label)
    scan.selection = {"annotation_files": files, "items": dict(sorted(items.items())), "images_listed": len(stated)}
    return scan
