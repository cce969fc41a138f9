"""`fakereasoning-annotate run`: request files against any OpenAI-compatible server.

Each request line's `body` is POSTed to ENDPOINT + its `url` by a fixed number
of worker threads (--concurrency); lines are read from the files as workers
take them (a queue of 2 x concurrency), so memory does not grow with the
files. A 429, a 5xx, a timeout or a dropped connection is retried with
exponential backoff and jitter (the server's Retry-After when it sends one),
up to --max-attempts; any other status is final.

The journal (--journal) is the resumable record, one line per finished
request in the Batch API's output format, so `collect` reads it like any
Batch output file: answers as {"response": {"status_code": 200, "body": ...}},
final failures with an "error" object. Each line is written and flushed when
its request ends. A rerun skips every custom_id the journal already has (with
--retry-errors, not those whose line is an error), so a killed run resumed
never sends an answered request again; a line cut by the kill is dropped.

The API key is read from an environment variable (--api-key-env, default
OPENAI_API_KEY) and sent only as the Authorization header; it is never
written or printed. A local server (vLLM, llama.cpp, ...) needs none.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from http.client import HTTPException
from typing import Iterator

from tqdm import tqdm

from .requests import AnnotateError

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class DirectConfig:
    """How `run` sends requests."""

    requests: tuple[str, ...]
    """Request files, or folders whose *.NNNNN.jsonl request files are all sent."""
    endpoint: str
    """Base URL of the server, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)."""
    journal: str
    """Journal file (Batch output format), created or resumed."""
    concurrency: int = 4
    """Requests in flight at most."""
    max_attempts: int = 6
    """Tries per request before it is recorded as failed."""
    timeout: float = 120.0
    """Seconds a request may wait for the server without receiving data."""
    backoff_base: float = 1.0
    """Seconds before the first retry; doubled each retry (with jitter)."""
    backoff_max: float = 60.0
    """Longest wait between two tries."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (unset: no Authorization header)."""
    require_api_key: bool = False
    """Fail when the variable is unset (set when --api-key-env is given explicitly)."""
    model: str | None = None
    """Replace the model name of every request body (None: send the files' model)."""
    retry_errors: bool = False
    """Send again the requests whose journal line is an error."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class DirectSummary:
    """What a run did."""

    files: int = 0
    requests: int = 0
    in_journal: int = 0
    to_send: int = 0
    answered: int = 0
    failed: int = 0
    retries: int = 0
    failures: list[str] = field(default_factory=list)


def request_files(paths: tuple[str, ...]) -> list[str]:
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(f for f in os.listdir(p) if f.endswith(".jsonl") and f[-12:-6].startswith(".")
                           and f[-11:-6].isdigit())
            if not found:
                raise AnnotateError(f"{p}: no request files (*.NNNNN.jsonl) in this folder")
            out += [os.path.join(p, f) for f in found]
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise AnnotateError(f"{p}: no such request file or folder")
    return out


def read_journal(path: str) -> dict[str, bool]:
    """custom_id -> whether its latest line is an error; a cut last line is truncated away."""
    done: dict[str, bool] = {}
    if not os.path.exists(path):
        return done
    with open(path, "rb+") as fh:
        data_end = 0
        for raw in fh:
            if not raw.endswith(b"\n"):
                break  # cut by a kill: dropped below, its request is sent again
            data_end += len(raw)
            try:
                obj = json.loads(raw)
                done[obj["custom_id"]] = bool(obj.get("error"))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise AnnotateError(f"{path}: a line that is not a result line at byte {data_end - len(raw)}; "
                                    "this is not a journal written by `run`") from None
        fh.truncate(data_end)
    return done


def _lines(files: list[str]) -> Iterator[tuple[str, int, dict]]:
    for path in files:
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                    if not (isinstance(obj, dict) and isinstance(obj.get("custom_id"), str)
                            and isinstance(obj.get("body"), dict)):
                        raise ValueError
                except ValueError:
                    raise AnnotateError(f"{path}:{n}: not a Batch request line "
                                        "(an object with custom_id, url and body)") from None
                yield path, n, obj


def _url(endpoint: str, path: str) -> str:
    base = endpoint.rstrip("/")
    if base.endswith("/v1") and path.startswith("/v1/"):
        base = base[:-3]
    return base + path


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class _Runner:
    def __init__(self, cfg: DirectConfig, key: str | None, summary: DirectSummary):
        self.cfg, self.key, self.summary = cfg, key, summary
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.journal = open(cfg.journal, "ab")
        self.bar = tqdm(total=summary.to_send, desc="requests", unit="req", disable=not cfg.progress)

    def record(self, cid: str, response: dict | None, error: dict | None) -> None:
        line = {"id": "direct_" + hashlib.sha1(cid.encode()).hexdigest()[:20], "custom_id": cid,
                "response": response, "error": error}
        data = (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        with self.lock:
            self.journal.write(data)
            self.journal.flush()
            if error:
                self.summary.failed += 1
                self.summary.failures.append(f"{cid}: {error['message']}")
            else:
                self.summary.answered += 1
            self.bar.update()

    def send(self, cid: str, url: str, body: dict) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        last = ""
        for attempt in range(self.cfg.max_attempts):
            if self.stop.is_set():
                return
            wait = None
            req = urllib.request.Request(_url(self.cfg.endpoint, url), data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout) as resp:
                    payload = resp.read()
                    status, req_id = resp.status, resp.headers.get("x-request-id")
            except urllib.error.HTTPError as exc:
                payload, status, req_id = exc.read(), exc.code, exc.headers.get("x-request-id")
                if status not in RETRY_STATUS:
                    self.record(cid, {"status_code": status, "request_id": req_id, "body": _body(payload)}, None)
                    return
                last, wait = f"HTTP {status}", _retry_after(exc.headers)
            except (urllib.error.URLError, HTTPException, OSError) as exc:  # timeouts, resets, refused
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            else:
                self.record(cid, {"status_code": status, "request_id": req_id, "body": _body(payload)}, None)
                return
            if attempt + 1 < self.cfg.max_attempts:
                with self.lock:
                    self.summary.retries += 1
                if wait is None:
                    wait = min(self.cfg.backoff_max, self.cfg.backoff_base * 2 ** attempt) * (0.5 + random.random() / 2)
                if self.stop.wait(min(wait, self.cfg.backoff_max)):
                    return
        self.record(cid, None, {"code": "max_attempts", "message": f"{self.cfg.max_attempts} tries, last: {last}"})

    def worker(self, q: queue.Queue) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            try:
                self.send(*item)
            except Exception as exc:  # a worker must not die silently: record and go on
                self.record(item[0], None, {"code": "client_error", "message": f"{type(exc).__name__}: {exc}"})

    def close(self) -> None:
        self.bar.close()
        self.journal.close()


def _body(payload: bytes):
    try:
        return json.loads(payload)
    except ValueError:
        return {"error": {"message": payload[:500].decode("utf-8", "replace")}}


def plan(cfg: DirectConfig) -> tuple[list[str], dict[str, bool], DirectSummary]:
    """Read the journal and count what is to send (the summary printed before sending)."""
    files = request_files(cfg.requests)
    done = read_journal(cfg.journal)
    s = DirectSummary(files=len(files))
    seen: set[str] = set()
    for path, n, obj in _lines(files):
        cid = obj["custom_id"]
        if cid in seen:
            raise AnnotateError(f"{path}:{n}: custom_id {cid!r} appears twice in the request files")
        seen.add(cid)
        s.requests += 1
        if cid in done and not (cfg.retry_errors and done[cid]):
            s.in_journal += 1
        else:
            s.to_send += 1
    return files, done, s


def run_direct(cfg: DirectConfig, files: list[str], done: dict[str, bool], summary: DirectSummary) -> DirectSummary:
    key = os.environ.get(cfg.api_key_env) or None
    if key is None and cfg.require_api_key:
        raise AnnotateError(f"the environment variable {cfg.api_key_env} is not set (it should hold the API key)")
    runner = _Runner(cfg, key, summary)
    q: queue.Queue = queue.Queue(maxsize=2 * cfg.concurrency)
    threads = [threading.Thread(target=runner.worker, args=(q,), daemon=True) for _ in range(cfg.concurrency)]
    for t in threads:
        t.start()
    try:
        for _path, _n, obj in _lines(files):
            cid = obj["custom_id"]
            if cid in done and not (cfg.retry_errors and done[cid]):
                continue
            body = dict(obj["body"], model=cfg.model) if cfg.model else obj["body"]
            q.put((cid, obj.get("url") or "/v1/chat/completions", body))
        for _ in threads:
            q.put(None)
        for t in threads:
            t.join()
    except KeyboardInterrupt:
        runner.stop.set()
        raise
    finally:
        runner.close()
    return summary
