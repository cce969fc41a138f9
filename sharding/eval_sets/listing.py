"""`manifest` adapter: a CSV or JSON Lines file listing the images.

Columns (CSV header / JSONL keys):

- `path` (required; `path_column` names another, e.g. B-Free's `filename`):
  image path, relative to the listing file's folder or absolute;
- `label` (required): 0/1, or real/fake (also 0_real/1_fake, nature/ai), any case;
- `generator` (optional): the group the image is reported under (default:
  the benchmark name);
- `reasoning` (optional): the reference reasoning, either a text or an object
  of attribute name -> text (JSONL object, or a JSON object string in CSV),
  joined like MMFR's references. Without it the image is detection-only;
- `md5_column` (optional, e.g. B-Free's viral images `md5`): the expected
  MD5 of the file; a file with another digest is not the listed image (a
  download that fetched an error page) and is rejected (`md5_mismatch`).

Every row becomes a sample or a counted rejection (`bad_label`, `missing`,
`duplicate`, `unsupported_extension`, `zero_byte`, `md5_mismatch`,
`bad_row`); rows read = written + rejected.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any

from .. import schema
from ..shard_set import file_digest
from .common import LABEL_FOLDERS, BenchmarkScan, ext_of

_LABEL_WORDS = {**{k: v for k, v in LABEL_FOLDERS.items()}, "0": 0, "1": 1}


def parse_label(value: Any) -> int | None:
    """0/1 from an int, a bool-free number or a label word; None if it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str):
        return _LABEL_WORDS.get(value.strip().lower())
    return None


def _read_rows(src: str, path_column: str = "path") -> list[tuple[str, Any]]:
    """(row name for messages, row) pairs; a malformed JSONL line is returned as its error text."""
    rows: list[tuple[str, Any]] = []
    name = os.path.basename(src)
    if src.lower().endswith(".csv"):
        with open(src, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or path_column not in reader.fieldnames or "label" not in reader.fieldnames:
                raise ValueError(f"{src}: the CSV header must have {path_column!r} and 'label' columns, "
                                 f"found {reader.fieldnames}")
            for i, row in enumerate(reader, start=2):
                rows.append((f"{name}:{i}", row))
    elif src.lower().endswith((".jsonl", ".ndjson")):
        with open(src, encoding="utf-8") as fh:
            for i, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"{name}:{i}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    rows.append((f"{name}:{i}", f"invalid JSON: {exc}"))
    else:
        raise ValueError(f"{src}: the manifest adapter reads .csv or .jsonl/.ndjson files")
    return rows


def _reasoning(value: Any) -> tuple[str, dict[str, str | None] | None]:
    if value is None or value == "":
        return "", None
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return value, None
    if isinstance(value, dict):
        return "", {str(k): (None if v is None else str(v)) for k, v in value.items()}
    return str(value), None


def scan_listing(src: str, benchmark: str, path_column: str = "path", md5_column: str | None = None) -> BenchmarkScan:
    src = os.path.abspath(src)
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src}: not a file (the manifest adapter needs a .csv or .jsonl file)")
    base = os.path.dirname(src)
    scan = BenchmarkScan(benchmark)
    seen: set[str] = set()
    for where, row in _read_rows(src, path_column):
        if not isinstance(row, dict) or not row.get(path_column):
            detail = row if isinstance(row, str) else f"row has no {path_column!r}"
            scan.reject(benchmark, where, "bad_row", detail)
            continue
        generator = str(row.get("generator") or benchmark)
        given = str(row[path_column])
        full = os.path.normpath(given if os.path.isabs(given) else os.path.join(base, given))
        inside = os.path.commonpath([full, base]) == base
        rel = (os.path.relpath(full, base) if inside else full.lstrip(os.sep)).replace(os.sep, "/")
        label = parse_label(row.get("label"))
        if label is None:
            scan.reject(generator, rel, "bad_label", f"{where}: label {row.get('label')!r} is not 0/1/real/fake")
        elif rel in seen:
            scan.reject(generator, rel, "duplicate", f"{where}: the image is listed more than once")
        elif ext_of(rel) not in schema.IMAGE_EXTENSIONS:
            scan.reject(generator, rel, "unsupported_extension", f"{where}: not an image extension")
        elif not os.path.isfile(full):
            scan.reject(generator, rel, "missing", f"{where}: {full} does not exist")
        else:
            seen.add(rel)
            st = os.stat(full)
            if st.st_size == 0:
                scan.reject(generator, rel, "zero_byte", "the file is empty")
                continue
            expected = str(row.get(md5_column) or "").strip().lower() if md5_column else ""
            if expected and file_digest(full, "md5") != expected:
                scan.reject(generator, rel, "md5_mismatch", f"{where}: the file's MD5 is not the listed {expected}")
                continue
            reference, attributes = _reasoning(row.get("reasoning"))
            scan.add(rel, generator, label, path=full, size=st.st_size,
                     fingerprint=f"{st.st_size}:{st.st_mtime_ns}", reference=reference, attributes=attributes)
    return scan
