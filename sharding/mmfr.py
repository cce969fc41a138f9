"""Reader of the released MMFR layout (docs/architecture.md, section 3) into shard samples.

`scan_mmfr(root)` walks the dataset once, joins the images on disk with the
LLaVA conversations of `forgery_reasoning_cot.json` and the attribute texts of
the `*_reasoning.json` files, and returns, per shard set ("train",
"eval/<generator>"), a deterministic list of candidate samples (sorted by
relative path) and the inputs it rejected, each with its path and reason.

Rules (docs/architecture.md, section 7): a training image needs at least one conversation
that concludes real/fake consistently with its source; evaluation images
without a reasoning annotation are kept for detection with has_reasoning
false. Problems with annotation records or whole JSON files are listed too
(kind "annotation" / "file"), but only images count in the reconciliation
"images seen = written + rejected". Image bytes are not read here (only
stat'ed): the writer workers validate them.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from . import schema
from .json_stream import JSONStreamError, iter_json_array
from .tar_writer import Rejection, ShardSample, StrictError

COT_FILE = "forgery_reasoning_cot.json"
EVAL_DIR = "evaluation_sets"

# Reasons for rejections made by the reader (image reasons live in images.REASONS).
REASONS: dict[str, str] = {
    "missing_json": "an expected annotation file does not exist",
    "malformed_json": "an annotation file is not valid JSON of the expected shape",
    "malformed_record": "a conversation record lacks image/conversations or a gpt answer",
    "malformed_attributes": "a reasoning entry is not an object of attribute -> text or null",
    "no_conclusion": "a conversation answer has no usable <CONCLUSION>real/fake</CONCLUSION>",
    "label_conflict": "annotations disagree with each other or with the image's source/folder",
    "no_annotation": "a training image has no valid conversation",
    "unknown_source": "an annotation points outside diffusiondb/, laion/ and evaluation_sets/",
    "unknown_label_folder": "an evaluation image is not under 0_real/ or 1_fake/",
}


@dataclass
class MMFRScan:
    """Result of scanning an MMFR root."""

    samples: dict[str, list[ShardSample]] = field(default_factory=dict)  # set name -> samples
    rejected: dict[str, list[Rejection]] = field(default_factory=dict)  # set name -> rejections
    records_seen: int = 0  # conversation records in the COT file

    def reject(self, set_name: str, rej: Rejection, strict: bool) -> None:
        if strict:
            raise StrictError(f"{rej.path}: {rej.reason}: {rej.detail}")
        self.rejected.setdefault(set_name, []).append(rej)

    def images_seen(self, set_name: str) -> int:
        rej = [r for r in self.rejected.get(set_name, []) if r.kind == "image"]
        return len(self.samples.get(set_name, [])) + len(rej)


def _ext(relpath: str) -> str:
    base = relpath.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _norm(path: str) -> str:
    p = path.replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    return p.lstrip("/")


def _walk(root: str, sub: str, entries: dict[str, os.DirEntry]) -> list[str]:
    """Root-relative paths of all files under root/sub, sorted.

    Like os.walk (no descent into symlinked folders, unreadable folders
    skipped), but each file's DirEntry goes into `entries`, so that `_stat`
    needs no path building and its stat() is the only stat call per image.
    """
    out = []
    stack = [sub]
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(os.path.join(root, rel)) as it:
                for e in it:
                    try:
                        is_dir = e.is_dir()
                    except OSError:
                        is_dir = False
                    if not is_dir:
                        r = f"{rel}/{e.name}"
                        out.append(r)
                        entries[r] = e
                    elif not e.is_symlink():
                        stack.append(f"{rel}/{e.name}")
        except OSError:
            continue
    out.sort()
    return out


def set_of(relpath: str) -> str | None:
    """Shard set an image path belongs to, or None if outside the layout."""
    parts = relpath.split("/")
    if parts[0] in schema.TRAIN_SOURCES and len(parts) >= 2:
        return "train"
    if parts[0] == EVAL_DIR and len(parts) >= 3:
        return f"eval/{parts[1]}"
    return None


def _load_json(root: str, rel: str, set_name: str, scan: MMFRScan, strict: bool) -> Any:
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        scan.reject(set_name, Rejection(rel, "missing_json", "file not found", "file"), strict)
        return None
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        scan.reject(set_name, Rejection(rel, "malformed_json", str(exc), "file"), strict)
        return None


def _parse_record(rec: Any) -> tuple[str, list[dict[str, str]], int | None, str]:
    """(image relpath, turns, label, problem) of one COT record; problem "" if fine."""
    if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
        return "", [], None, "malformed_record"
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not turns or not all(
            isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
            for t in turns):
        return _norm(rec["image"]), [], None, "malformed_record"
    # The schema's turn is exactly {from, value} (METADATA_SCHEMA "conversations"):
    # any other key of a LLaVA turn is not carried into the shard.
    turns = [{"from": t["from"], "value": t["value"]} for t in turns]
    answers = [t["value"] for t in turns if t["from"] == "gpt"]
    if not answers:
        return _norm(rec["image"]), turns, None, "malformed_record"
    labels = {schema.conclusion_label(a) for a in answers}
    if None in labels:
        return _norm(rec["image"]), turns, None, "no_conclusion"
    if len(labels) > 1:
        return _norm(rec["image"]), turns, None, "label_conflict"
    return _norm(rec["image"]), turns, labels.pop(), ""


def _read_cot(root: str, scan: MMFRScan, strict: bool) -> dict[str, list[tuple[str, list, int]]]:
    """Valid COT records grouped by image relpath: [(record id, turns, label)].

    The file is read one record at a time (json_stream.iter_json_array: memory is
    one block and one record, not the whole file and its parse); a malformed file
    is rejected whole, as before, with nothing taken from it."""
    path = os.path.join(root, COT_FILE)
    if not os.path.isfile(path):
        scan.reject("train", Rejection(COT_FILE, "missing_json", "file not found", "file"), strict)
        return {}
    by_image: dict[str, list[tuple[str, list, int]]] = {}
    problems: list[tuple[str, Rejection]] = []
    seen = 0
    try:
        for i, rec in enumerate(iter_json_array(path)):
            seen += 1
            image, turns, label, problem = _parse_record(rec)
            rid = str(rec.get("id", i)) if isinstance(rec, dict) else str(i)
            if problem:
                problems.append((set_of(image) or "train", Rejection(
                    f"{COT_FILE}[{i}]", problem, f"record id {rid!r}, image {image!r}", "annotation")))
                continue
            by_image.setdefault(image, []).append((rid, turns, label))
    except (UnicodeDecodeError, JSONStreamError) as exc:
        scan.reject("train", Rejection(COT_FILE, "malformed_json", str(exc), "file"), strict)
        return {}
    scan.records_seen = seen
    for target, rejection in problems:
        scan.reject(target, rejection, strict)
    return by_image


def _read_reasoning(root: str, json_rel: str, set_name: str, on_disk: set[str], scan: MMFRScan,
                    strict: bool) -> tuple[dict[str, dict[str, str | None]], dict[str, int]]:
    """Attributes of one *_reasoning.json, keyed by root-relative image path,
    and the position of each image's entry in the file (0-based, file order).

    The position is what the reference evaluation selects by (the first N
    real and N fake entries of each generator's JSON); shards sort images by
    path, so the order is kept as metadata `reasoning_index`.

    Keys are documented as relative to the folder above the source folder
    ("flux/1_fake/x.png"); keys relative to the root or to the source folder
    itself are accepted too, whichever names a file on disk.
    """
    data = _load_json(root, json_rel, set_name, scan, strict)
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        scan.reject(set_name, Rejection(json_rel, "malformed_json", "top level is not an object", "file"), strict)
        return {}, {}
    folder = json_rel.rsplit("/", 1)[0]  # e.g. evaluation_sets/flux
    parent = folder.rsplit("/", 1)[0] if "/" in folder else ""
    out: dict[str, dict[str, str | None]] = {}
    order: dict[str, int] = {}
    # json.loads keeps the file's key order; a malformed entry keeps its
    # position too, so indices are positions in the file, not among valid entries.
    for position, (key, attrs) in enumerate(data.items()):
        k = _norm(key)
        options = [f"{parent}/{k}" if parent else k, k, f"{folder}/{k}"]
        rel = next((o for o in options if o in on_disk), options[0])
        if not isinstance(attrs, dict) or not all(
                isinstance(a, str) and (v is None or isinstance(v, str)) for a, v in attrs.items()):
            scan.reject(set_name, Rejection(f"{json_rel}[{key}]", "malformed_attributes",
                                            f"value is {type(attrs).__name__}", "annotation"), strict)
            continue
        out[rel] = attrs
        order[rel] = position
    return out, order


def _stat(root: str, rel: str, entries: dict[str, os.DirEntry]) -> tuple[int, str] | None:
    """(size, fingerprint) of a regular file (symlinks followed), None if there is none."""
    try:
        e = entries.get(rel)
        st = e.stat() if e is not None else os.stat(os.path.join(root, rel))
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return st.st_size, f"{st.st_size}:{st.st_mtime_ns}"


def scan_mmfr(root: str, strict: bool = False) -> MMFRScan:
    """Scan an MMFR root; see the module doc. Raises StrictError under `strict`."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"MMFR root {root} is not a directory")
    scan = MMFRScan()
    entries: dict[str, os.DirEntry] = {}
    files = _walk(root, "diffusiondb", entries) + _walk(root, "laion", entries)
    eval_root = os.path.join(root, EVAL_DIR)
    gens = sorted(os.listdir(eval_root)) if os.path.isdir(eval_root) else []
    gens = [g for g in gens if os.path.isdir(os.path.join(eval_root, g))]
    # Reference order first, then any extra generator folder alphabetically.
    gens = [g for g in schema.GENERATORS if g in gens] + [g for g in gens if g not in schema.GENERATORS]
    for g in gens:
        files += _walk(root, f"{EVAL_DIR}/{g}", entries)
    reasoning_files = [f"{s}/{s}_reasoning.json" for s in schema.TRAIN_SOURCES]
    reasoning_files += [f"{EVAL_DIR}/{g}/{g}_reasoning.json" for g in gens]
    images = {f for f in files if _ext(f) in schema.IMAGE_EXTENSIONS}
    others = {f for f in files if f not in images and f not in reasoning_files}
    for f in sorted(others):
        scan.reject(set_of(f) or "train", Rejection(f, "unsupported_extension",
                                                    f"extension {_ext(f)!r} is not an image extension"), strict)
    for s in ["train"] + [f"eval/{g}" for g in gens]:
        scan.samples[s] = []
    attributes: dict[str, dict[str, str | None]] = {}
    reasoning_order: dict[str, int] = {}
    for jr in reasoning_files:
        parts = jr.split("/")
        set_name = "train" if parts[0] in schema.TRAIN_SOURCES else f"eval/{parts[1]}"
        attrs_of, order_of = _read_reasoning(root, jr, set_name, images, scan, strict)
        attributes.update(attrs_of)
        reasoning_order.update(order_of)
    cot = _read_cot(root, scan, strict)

    referenced = set(cot) | set(attributes)
    for rel in sorted((images | referenced) - others):
        set_name = set_of(rel)
        records = cot.get(rel, [])
        if set_name is None:
            scan.reject("train", Rejection(rel, "unknown_source", "annotated image outside the MMFR layout"), strict)
            continue
        scan.samples.setdefault(set_name, [])
        parts = rel.split("/")
        if set_name == "train":
            source, generator, label = parts[0], parts[0], schema.TRAIN_SOURCE_LABEL[parts[0]]
        else:
            source = generator = parts[1]
            label = schema.EVAL_LABEL_FOLDERS.get(parts[2]) if len(parts) >= 4 else None
            if label is None:
                scan.reject(set_name, Rejection(rel, "unknown_label_folder",
                                                "evaluation images must be under 0_real/ or 1_fake/"), strict)
                continue
        st = _stat(root, rel, entries) if rel in images else None
        if st is None:
            scan.reject(set_name, Rejection(rel, "missing", "referenced by an annotation but not on disk"), strict)
            continue
        if set_name == "train" and not records:
            scan.reject(set_name, Rejection(rel, "no_annotation", f"no valid record in {COT_FILE}"), strict)
            continue
        bad = sorted({r[2] for r in records} - {label})
        if bad:
            scan.reject(set_name, Rejection(rel, "label_conflict",
                                            f"source/folder says {label}, conversations conclude {bad}"), strict)
            continue
        if st[0] == 0:
            scan.reject(set_name, Rejection(rel, "zero_byte", "the file is empty"), strict)
            continue
        attrs = attributes.get(rel)
        meta = {
            "relpath": rel, "source": source, "split": "train" if set_name == "train" else "eval",
            "label": label, "generator": generator,
            "conversations": [r[1] for r in records], "record_ids": [r[0] for r in records],
            "attributes": attrs, "reference": schema.reference_text(attrs),
            "has_reasoning": attrs is not None, "reasoning_index": reasoning_order.get(rel),
        }
        scan.samples[set_name].append(ShardSample(
            key=schema.sample_key(rel), relpath=rel, path=os.path.join(root, rel),
            metadata=meta, size=st[0], fingerprint=st[1]))
    return scan
