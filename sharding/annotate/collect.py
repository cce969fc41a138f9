"""`fakereasoning-annotate collect`: answers -> the MMFR layout the sharder reads.

Inputs: result files (Batch API output/error files, `vllm run-batch` output,
the direct mode's journal; all one format) and the request folders that
`requests` wrote (their `*.index.jsonl` tie each custom_id to its image).
Output, under MMFR_ROOT:
  evaluation_sets/<gen>/<0_real|1_fake>/<image>   symlink to the image (or a copy, --copy)
  evaluation_sets/<gen>/<gen>_reasoning.json      "<gen>/<label>/<image>" -> {attribute: text or null},
                                                  the label's five attribute names always present
  forgery_reasoning_cot.json                      with --conversations: LLaVA-CoT records (id = custom_id)
  annotate/<gen>.provenance.json                  per image: custom_id, prompt version, model, result file
  annotate_report.json                            what this collect kept and rejected, per generator and label
The JSON files are merged with what is there (entries of other images are
kept, entries of the same image are replaced), and a file is rewritten only
when its bytes change, so collecting the same results twice leaves every file
byte-identical and new result files add to the dataset.

Per custom_id, a kept answer wins over a rejected one, and among lines of the
same kind the last one read wins (the journal appends retries).

Where CAPTION comes from (--conversations): the `--captions FILE` text for the
image if given (a JSON object keyed by custom_id or file name), else the
answer's "Caption" (the packaged prompts ask for one in the same request, so
no second request per image is needed). An image with neither gets no
conversation record (counted as "no_caption"); its reasoning entry is kept.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .. import schema
from ..synthetic.annotations import layout_answer
from .answers import REASONS, Answer, Rejected, parse_answer, read_result
from .requests import LABEL_FOLDER, AnnotateError

COT_FILE = "forgery_reasoning_cot.json"
REPORT_FILE = "annotate_report.json"
# The SUMMARY and the sentence that closes the REASONING of every conversation
# record: the fixed parts of the LLaVA-CoT answer layout, in this project's words.
SUMMARY = ("I will describe what the image shows, examine it for the visual cues that separate "
           "generated images from photographs, and then state whether it is real or fake.")
CLOSING = {1: "Together these cues show that the image was made by a generative model.",
           0: "Together these cues are what a genuine photograph shows, with no sign of generation."}


@dataclass(frozen=True)
class CollectConfig:
    """What `collect` reads and writes."""

    results: tuple[str, ...]
    """Result files: Batch output/error files, `vllm run-batch` output, direct-mode journals."""
    requests: tuple[str, ...]
    """Request folders written by `requests` (their *.index.jsonl files)."""
    out: str
    """MMFR root to write into (created; merged with what is there)."""
    copy: bool = False
    """Copy images instead of symlinking them."""
    conversations: bool = False
    """Also write LLaVA-CoT records into MMFR_ROOT/forgery_reasoning_cot.json."""
    captions: str | None = None
    """JSON object custom_id or file name -> caption text, used before the answers' "Caption"."""


@dataclass
class GroupStats:
    """Counts of one generator and label."""

    requests: int = 0
    answers: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    attributes: Counter = field(default_factory=Counter)
    unknown_attribute_names: Counter = field(default_factory=Counter)
    conversations: int = 0
    no_caption: int = 0
    tokens: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "answers": self.answers, "kept": self.kept,
                "rejected": dict(sorted(self.rejected.items())), "rejected_total": sum(self.rejected.values()),
                "attribute_frequency": dict(sorted(self.attributes.items())),
                "unknown_attribute_names": dict(sorted(self.unknown_attribute_names.items())),
                "conversations": self.conversations, "no_caption": self.no_caption,
                "tokens": dict(sorted(self.tokens.items()))}


@dataclass
class _Best:
    """The outcome chosen so far for one custom_id."""

    answer: Answer | None
    rejection: Rejected | None
    where: str  # "file:line" of the line that decided


def _load_index(dirs: tuple[str, ...]) -> dict[str, dict]:
    index: dict[str, dict] = {}
    for d in dirs:
        files = sorted(glob.glob(os.path.join(glob.escape(d), "*.index.jsonl")))
        if not files:
            raise AnnotateError(f"{d}: no *.index.jsonl here (is it a folder written by `requests`?)")
        for path in files:
            with open(path, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    try:
                        entry = json.loads(line)
                        cid = entry["custom_id"]
                    except (ValueError, KeyError, TypeError):
                        raise AnnotateError(f"{path}:{n}: not an index line written by `requests`") from None
                    if cid in index and index[cid]["path"] != entry["path"]:
                        raise AnnotateError(f"{path}:{n}: custom_id {cid!r} is also requested for "
                                            f"{index[cid]['path']}")
                    index[cid] = entry
    return index


def _group(cid: str, index: dict[str, dict]) -> tuple[str, str]:
    e = index.get(cid)
    if e is not None:
        return e["generator"], LABEL_FOLDER[e["label"]]
    parts = cid.split("/")
    return (parts[0], parts[1]) if len(parts) == 3 else ("?", "?")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_if_changed(path: str, data: bytes) -> bool:
    try:
        with open(path, "rb") as fh:
            if fh.read() == data:
                return False
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return True


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=1) + "\n").encode("utf-8")


def _load_json(path: str, kind: type, default: Any) -> Any:
    if not os.path.exists(path):
        return default
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotateError(f"{path}: cannot merge into it: not valid JSON ({exc})") from None
    if not isinstance(data, kind):
        raise AnnotateError(f"{path}: cannot merge into it: the top level is not a {kind.__name__}")
    return data


class _Collector:
    def __init__(self, cfg: CollectConfig):
        self.cfg = cfg
        self.index = _load_index(cfg.requests)
        self.stats: dict[tuple[str, str], GroupStats] = {}
        self.best: dict[str, _Best] = {}
        self.listed: list[dict[str, str]] = []  # every rejection, with where it came from
        self.answered: set[str] = set()

    def stats_of(self, gen: str, label: str) -> GroupStats:
        return self.stats.setdefault((gen, label), GroupStats())

    def read(self, path: str) -> None:
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                where = f"{os.path.basename(path)}:{n}"
                if not raw.strip():
                    continue
                try:
                    res = read_result(json.loads(raw))
                except (UnicodeDecodeError, ValueError):
                    self.listed.append({"custom_id": "", "reason": "malformed_line", "where": where,
                                        "detail": "not a JSON line (a cut last line of a killed run?)"})
                    continue
                except Rejected as rej:
                    self.listed.append({"custom_id": "", "reason": rej.reason, "where": where, "detail": rej.detail})
                    continue
                self.take(res, where)

    def take(self, res, where: str) -> None:
        cid = res.custom_id
        gen, label = _group(cid, self.index)
        st = self.stats_of(gen, label)
        st.tokens.update(res.usage)
        entry = self.index.get(cid)
        if entry is None:
            self.listed.append({"custom_id": cid, "reason": "no_request", "where": where,
                                "detail": REASONS["no_request"]})
            st.rejected["no_request"] += 1
            return
        self.answered.add(cid)
        answer, rejection = None, res.rejection
        if rejection is None:
            try:
                answer = parse_answer(res.content, entry["label"])
            except Rejected as rej:
                rejection = rej
        old = self.best.get(cid)
        if old is None or answer is not None or old.answer is None:
            self.best[cid] = _Best(answer, rejection, where)

    def finish(self) -> tuple[dict[str, dict[str, Answer]], dict[str, dict]]:
        """Decide every request: kept answers per generator, and provenance."""
        kept: dict[str, dict[str, Answer]] = {}
        for cid in sorted(self.index):
            entry = self.index[cid]
            st = self.stats_of(entry["generator"], LABEL_FOLDER[entry["label"]])
            st.requests += 1
            best = self.best.get(cid)
            if best is None:
                self.reject(cid, st, Rejected("no_answer", REASONS["no_answer"]), "")
                continue
            st.answers += 1
            if best.answer is None:
                self.reject(cid, st, best.rejection, best.where)
                continue
            if not os.path.isfile(entry["path"]):
                self.reject(cid, st, Rejected("image_missing", entry["path"]), best.where)
                continue
            if _sha256(entry["path"]) != entry["sha256"]:
                self.reject(cid, st, Rejected("image_changed", entry["path"]), best.where)
                continue
            st.kept += 1
            st.attributes.update(k for k, v in best.answer.attributes.items() if v)
            st.unknown_attribute_names.update(best.answer.unknown_names)
            kept.setdefault(entry["generator"], {})[cid] = best.answer
        return kept, {cid: {"custom_id": cid, "prompt_version": self.index[cid]["prompt_version"],
                            "model": self.index[cid]["model"], "result": self.best[cid].where}
                      for answers in kept.values() for cid in answers}

    def reject(self, cid: str, st: GroupStats, rej: Rejected, where: str) -> None:
        st.rejected[rej.reason] += 1
        self.listed.append({"custom_id": cid, "reason": rej.reason, "where": where, "detail": rej.detail})


def _place_image(src: str, dst: str, copy: bool) -> None:
    """Link (or copy) src to dst; an existing dst must already be this image."""
    if os.path.lexists(dst):
        if os.path.islink(dst) and os.readlink(dst) == src:
            return
        if os.path.isfile(dst) and _sha256(dst) == _sha256(src):
            return
        raise AnnotateError(f"{dst} exists and is not the image {src}; move it away or use another MMFR root")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if copy:
        shutil.copyfile(src, dst + ".tmp")
        os.replace(dst + ".tmp", dst)
    else:
        os.symlink(src, dst)


def _merge_dict(path: str, new: dict[str, Any]) -> bytes:
    """Existing entries in their order (replaced in place), then new keys sorted."""
    merged = _load_json(path, dict, {})
    for k in sorted(new):
        merged[k] = new[k]
    return _dumps(merged)


def _conversation(cid: str, image: str, answer: Answer, label: int, caption: str, entry: dict) -> dict:
    steps = " ".join(f"{name}: {text}" for name, text in answer.attributes.items() if text)
    text = layout_answer(SUMMARY, caption, f"{steps} {CLOSING[label]}",
                         schema.FAKE_CONCLUSION if label else schema.REAL_CONCLUSION)
    return {"id": cid, "image": image,
            "conversations": [{"from": "human", "value": f"<image>\n{schema.EVAL_QUESTION}"},
                              {"from": "gpt", "value": text}],
            "prompt_version": entry["prompt_version"], "model": entry["model"]}


def _load_captions(path: str | None) -> dict[str, str]:
    if path is None:
        return {}
    data = _load_json(path, dict, None)
    if data is None:
        raise AnnotateError(f"{path}: caption file not found")
    bad = [k for k, v in data.items() if not isinstance(v, str)]
    if bad:
        raise AnnotateError(f"{path}: captions must be strings; not for {bad[:5]}")
    return data


def collect(cfg: CollectConfig) -> dict[str, Any]:
    """Collect answers into cfg.out; returns the report (also written as annotate_report.json)."""
    captions = _load_captions(cfg.captions)
    c = _Collector(cfg)
    for path in cfg.results:
        if not os.path.isfile(path):
            raise AnnotateError(f"{path}: result file not found")
        c.read(path)
    kept, provenance = c.finish()
    eval_root = os.path.join(cfg.out, "evaluation_sets")
    records: list[dict] = []
    for gen in sorted(kept):
        reasoning = {}
        for cid, answer in kept[gen].items():
            entry = c.index[cid]
            _place_image(entry["path"], os.path.join(eval_root, cid), cfg.copy)
            reasoning[cid] = answer.attributes
            if not cfg.conversations:
                continue
            st = c.stats_of(gen, LABEL_FOLDER[entry["label"]])
            caption = captions.get(cid) or captions.get(entry["file"]) or answer.caption
            if not caption:
                st.no_caption += 1
                continue
            st.conversations += 1
            records.append(_conversation(cid, f"evaluation_sets/{cid}", answer, entry["label"], caption, entry))
        path = os.path.join(eval_root, gen, f"{gen}_reasoning.json")
        _write_if_changed(path, _merge_dict(path, reasoning))
        prov = os.path.join(cfg.out, "annotate", f"{gen}.provenance.json")
        _write_if_changed(prov, _merge_dict(prov, {k: v for k, v in provenance.items() if k in kept[gen]}))
    if records:
        path = os.path.join(cfg.out, COT_FILE)
        existing = _load_json(path, list, [])
        new = {r["id"]: r for r in records}
        merged = [new.pop(r["id"]) if isinstance(r, dict) and r.get("id") in new else r for r in existing]
        merged += [new[k] for k in sorted(new)]
        _write_if_changed(path, _dumps(merged))
    report = {
        "results": [os.path.basename(p) for p in cfg.results],
        "reasons": REASONS,
        "groups": [{"generator": g, "label": lab, **s.as_dict()} for (g, lab), s in sorted(c.stats.items())],
        "rejected": c.listed,
    }
    _write_if_changed(os.path.join(cfg.out, REPORT_FILE), _dumps(report))
    return report


def report_table(report: dict[str, Any]) -> str:
    """The printed table: one row per generator and label."""
    rows = [("generator", "label", "requests", "answers", "kept", "rejected", "by reason", "tokens")]
    for g in report["groups"]:
        reasons = ", ".join(f"{k} {v}" for k, v in g["rejected"].items()) or "-"
        rows.append((g["generator"], g["label"], str(g["requests"]), str(g["answers"]), str(g["kept"]),
                     str(g["rejected_total"]), reasons, str(g["tokens"].get("total_tokens", "-"))))
    unattributed = [r for r in report["rejected"] if not r["custom_id"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    if unattributed:
        lines.append(f"{len(unattributed)} result line(s) without a custom_id: "
                     + "; ".join(f"{r['where']} {r['reason']}" for r in unattributed[:5]))
    return "\n".join(lines)
