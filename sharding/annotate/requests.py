"""`fakereasoning-annotate requests`: a folder of images -> OpenAI Batch JSONL request files.

For one generator and one label it writes, into REQ_DIR:
  <gen>.<label folder>.NNNNN.jsonl   request files (Batch API input format), cut by
                                     request count and by bytes
  <gen>.<label folder>.index.jsonl   one line per request: custom_id -> stored image
                                     (path, size, sha256, MIME, sizes stored/sent,
                                     prompt version, model): what `collect` reads
  <gen>.<label folder>.summary.json  the summary that is printed
Images are read one at a time and each request line is written before the next
image is read, so memory does not grow with the folder (benchmarks/bench_annotate.py).
Files appear under their final names only at the end; a rerun replaces a
previous run's files of the same generator and label.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Iterator

from tqdm import tqdm

from .. import schema
from .media import ImageProblem, image_tokens, prepare
from .prompts import PromptSet, load_prompts

LABEL_FOLDER: dict[int, str] = {v: k for k, v in schema.EVAL_LABEL_FOLDERS.items()}
CHAT_URL = "/v1/chat/completions"
# The Batch API's documented limits per input file (50,000 requests, 200 MB).
DEFAULT_MAX_REQUESTS = 50_000
DEFAULT_MAX_BYTES = 200 * 1024 * 1024
_GENERATOR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class AnnotateError(ValueError):
    """A problem that stops the command; the message names the file and the reason."""


@dataclass(frozen=True)
class RequestsConfig:
    """What `requests` builds."""

    images: str
    """Folder of images of one generator and one label (walked recursively)."""
    label: int
    """1 fake, 0 real: selects the prompt and the custom_id's label folder."""
    generator: str
    """Generator name: the MMFR folder evaluation_sets/<generator>/ the answers go to."""
    out: str
    """Request folder REQ_DIR (created; may hold several generators and labels)."""
    prompt: str | None = None
    """Prompt file (None: the packaged default, prompts/mmfr-v1.json)."""
    model: str = "gpt-4o"
    """Model name put into every request body (for vLLM: the served model's name)."""
    max_tokens: int = 1024
    """Answer length limit put into every request body."""
    detail: str = "high"
    """Image detail setting of the requests ("low", "high", "auto"), also used for the token estimate."""
    max_side: int | None = None
    """Downsize what is sent so that its longer side is at most this many pixels (None: send as stored)."""
    max_requests_per_file: int = DEFAULT_MAX_REQUESTS
    """Requests per file at most (the Batch API allows 50,000)."""
    max_bytes_per_file: int = DEFAULT_MAX_BYTES
    """Bytes per file at most (the Batch API allows 200 MB)."""
    dry_run: bool = False
    """Compute and print the summary, write nothing."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class FileStats:
    """One request file written."""

    name: str
    requests: int = 0
    bytes: int = 0


@dataclass
class RequestsSummary:
    """What `requests` did (printed, and written as <prefix>.summary.json)."""

    generator: str
    label: str
    prompt_version: str
    prompt_file: str
    model: str
    detail: str
    max_side: int | None
    images_seen: int = 0
    requests: int = 0
    bytes: int = 0
    image_tokens_estimate: int = 0
    text_tokens_estimate: int = 0
    files: list[FileStats] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    dry_run: bool = False

    def text(self) -> str:
        lines = [f"{'DRY RUN: ' if self.dry_run else ''}{self.generator}/{self.label} "
                 f"(prompt {self.prompt_version}, model {self.model}, detail {self.detail}"
                 f"{f', max side {self.max_side}' if self.max_side else ''})",
                 f"  images seen     {self.images_seen}",
                 f"  requests        {self.requests}",
                 f"  files           {len(self.files)}",
                 f"  bytes           {self.bytes} ({self.bytes / 2**20:.1f} MiB)",
                 f"  input tokens    ~{self.image_tokens_estimate} for images (GPT-4o tile rule) + "
                 f"~{self.text_tokens_estimate} for prompt text (4 characters per token)",
                 f"  skipped         {len(self.skipped)}"]
        lines += [f"    {s['path']}: {s['reason']}: {s['detail']}" for s in self.skipped[:20]]
        if len(self.skipped) > 20:
            lines.append(f"    ... {len(self.skipped) - 20} more in the summary file")
        return "\n".join(lines)


def prefix_of(generator: str, label: int) -> str:
    return f"{generator}.{LABEL_FOLDER[label]}"


def custom_id(generator: str, label: int, file_name: str) -> str:
    """`<generator>/<0_real|1_fake>/<file name>`: the key layout of <gen>_reasoning.json."""
    return f"{generator}/{LABEL_FOLDER[label]}/{file_name}"


def _walk_sorted(root: str) -> Iterator[str]:
    """Files under `root` (absolute paths), depth first in name order, one folder listed at a time."""
    try:
        with os.scandir(root) as it:
            # (name, is folder) only: a DirEntry per file would cost several times more
            entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
    except OSError as exc:
        raise AnnotateError(f"{root}: cannot list the folder: {exc.strerror or exc}") from None
    for name, is_dir in entries:
        path = os.path.join(root, name)
        if is_dir:
            yield from _walk_sorted(path)
        else:
            yield path


def request_line(cid: str, prompt: str, data_url: str, cfg: RequestsConfig) -> dict:
    """One line of a Batch input file: a chat completion with the prompt and the image."""
    return {
        "custom_id": cid, "method": "POST", "url": CHAT_URL,
        "body": {
            "model": cfg.model,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": prompt},
                {"type": "image_url", "image_url": {"url": data_url, "detail": cfg.detail}},
            ]}],
            "max_tokens": cfg.max_tokens,
        },
    }


class _Writer:
    """Request files cut by count and bytes, written under temporary names."""

    def __init__(self, cfg: RequestsConfig, prefix: str, summary: RequestsSummary):
        self.cfg, self.prefix, self.summary = cfg, prefix, summary
        self.fh = None
        self.current: FileStats | None = None

    def _open_next(self) -> None:
        self.close()
        self.current = FileStats(f"{self.prefix}.{len(self.summary.files):05d}.jsonl")
        self.summary.files.append(self.current)
        if not self.cfg.dry_run:
            self.fh = open(os.path.join(self.cfg.out, f".{self.current.name}.tmp"), "wb")

    def fits_alone(self, n: int) -> bool:
        return n <= self.cfg.max_bytes_per_file

    def write(self, line: bytes) -> str:
        cur = self.current
        if (cur is None or cur.requests >= self.cfg.max_requests_per_file
                or cur.bytes + len(line) > self.cfg.max_bytes_per_file):
            self._open_next()
            cur = self.current
        if self.fh is not None:
            self.fh.write(line)
        cur.requests += 1
        cur.bytes += len(line)
        return cur.name

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def _tmp(cfg: RequestsConfig, name: str) -> str:
    return os.path.join(cfg.out, f".{name}.tmp")


def _publish(cfg: RequestsConfig, prefix: str, summary: RequestsSummary) -> None:
    """Rename the temporary files into place and remove the previous run's extra parts."""
    keep = {f.name for f in summary.files} | {f"{prefix}.index.jsonl", f"{prefix}.summary.json"}
    with open(_tmp(cfg, f"{prefix}.summary.json"), "w", encoding="utf-8") as fh:
        json.dump(asdict(summary), fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    for name in sorted(keep):
        os.replace(_tmp(cfg, name), os.path.join(cfg.out, name))
    part = re.compile(re.escape(prefix) + r"\.\d{5}\.jsonl$")
    for name in os.listdir(cfg.out):
        if part.match(name) and name not in keep:
            os.remove(os.path.join(cfg.out, name))


def _cleanup(cfg: RequestsConfig, prefix: str) -> None:
    for name in os.listdir(cfg.out):
        if name.startswith(f".{prefix}.") and name.endswith(".tmp"):
            os.remove(os.path.join(cfg.out, name))


def build_requests(cfg: RequestsConfig) -> RequestsSummary:
    """Write (or, under dry_run, only count) the request files of one folder; see the module doc."""
    if cfg.label not in LABEL_FOLDER:
        raise AnnotateError(f"label must be 0 (real) or 1 (fake), got {cfg.label!r}")
    if not _GENERATOR.match(cfg.generator):
        raise AnnotateError(f"generator name {cfg.generator!r}: use letters, digits, '_' and '-' "
                            "(it becomes a folder name and the first part of every custom_id)")
    if not os.path.isdir(cfg.images):
        raise AnnotateError(f"{cfg.images}: not a folder of images")
    prompts: PromptSet = load_prompts(cfg.prompt)
    prompt = prompts.text(cfg.label)
    prefix = prefix_of(cfg.generator, cfg.label)
    summary = RequestsSummary(cfg.generator, LABEL_FOLDER[cfg.label], prompts.version, prompts.path, cfg.model,
                              cfg.detail, cfg.max_side, dry_run=cfg.dry_run)
    if not cfg.dry_run:
        os.makedirs(cfg.out, exist_ok=True)
    writer = _Writer(cfg, prefix, summary)
    # File names seen (one label and generator: the name decides the custom_id). Names,
    # not paths, are kept: the other path of a collision is found again by a walk.
    seen: set[str] = set()
    index = None if cfg.dry_run else open(_tmp(cfg, f"{prefix}.index.jsonl"), "w", encoding="utf-8")
    bar = tqdm(desc=f"requests {prefix}", unit="img", disable=not cfg.progress)
    try:
        for path in _walk_sorted(os.path.abspath(cfg.images)):
            name = os.path.basename(path)
            ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
            if ext not in schema.IMAGE_EXTENSIONS:
                summary.skipped.append({"path": path, "reason": "not_an_image",
                                        "detail": f"extension {ext!r} is not an image extension"})
                continue
            summary.images_seen += 1
            bar.update()
            cid = custom_id(cfg.generator, cfg.label, name)
            if name in seen:
                first = next(p for p in _walk_sorted(os.path.abspath(cfg.images)) if os.path.basename(p) == name)
                raise AnnotateError(f"{path} and {first} both map to custom_id {cid!r} (the file name); "
                                    "rename one of them: the MMFR layout keeps one file per name")
            seen.add(name)
            try:
                with open(path, "rb") as fh:
                    raw = fh.read()
                img = prepare(raw, cfg.max_side)
            except OSError as exc:
                summary.skipped.append({"path": path, "reason": "unreadable", "detail": str(exc.strerror or exc)})
                continue
            except ImageProblem as exc:
                summary.skipped.append({"path": path, "reason": "bad_image", "detail": str(exc)})
                continue
            line = (json.dumps(request_line(cid, prompt, img.data_url(), cfg), ensure_ascii=False,
                               separators=(",", ":")) + "\n").encode("utf-8")
            if not writer.fits_alone(len(line)):
                summary.skipped.append({"path": path, "reason": "too_large",
                                        "detail": f"its request is {len(line)} bytes, more than "
                                                  f"--max-bytes-per-file {cfg.max_bytes_per_file}; use --max-side"})
                continue
            file_name = writer.write(line)
            tokens = image_tokens(img.sent_width, img.sent_height, cfg.detail)
            summary.requests += 1
            summary.bytes += len(line)
            summary.image_tokens_estimate += tokens
            summary.text_tokens_estimate += (len(prompt) + 3) // 4
            if index is not None:
                index.write(json.dumps({
                    "custom_id": cid, "generator": cfg.generator, "label": cfg.label, "path": path,
                    "file": name, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
                    "mime": img.mime, "width": img.width, "height": img.height, "sent_width": img.sent_width,
                    "sent_height": img.sent_height, "transformed": img.transformed, "max_side": cfg.max_side,
                    "request_file": file_name, "prompt_version": prompts.version, "model": cfg.model,
                    "image_tokens_estimate": tokens}, ensure_ascii=False, sort_keys=True) + "\n")
        writer.close()
        if index is not None:
            index.close()
            index = None
            _publish(cfg, prefix, summary)
    finally:
        bar.close()
        writer.close()
        if index is not None:
            index.close()
        if not cfg.dry_run:
            _cleanup(cfg, prefix)
    return summary
