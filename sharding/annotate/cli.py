"""Command line of `fakereasoning-annotate` (= `python -m sharding.annotate`).

    fakereasoning-annotate requests --images DIR --label fake|real --generator NAME --out REQ_DIR
    fakereasoning-annotate run REQ_DIR... --endpoint URL --journal FILE
    fakereasoning-annotate collect RESULTS... --requests REQ_DIR --out MMFR_ROOT

Each subcommand parses its options into a config and calls one function
(requests.build_requests, direct.run_direct, collect.collect).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from ..shard_mmfr import _positive, parse_size
from .collect import CollectConfig, collect, report_table
from .direct import DirectConfig, plan, run_direct
from .prompts import DEFAULT_PROMPT_FILE, PromptError
from .requests import DEFAULT_MAX_BYTES, DEFAULT_MAX_REQUESTS, AnnotateError, RequestsConfig, build_requests

LABELS = {"fake": 1, "real": 0}


def _seconds(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def _requests_parser(sub) -> None:
    p = sub.add_parser("requests", help="images -> OpenAI Batch JSONL request files",
                       description="Write request files in the OpenAI Batch JSONL format for one folder of "
                                   "images of one generator and label (custom_id "
                                   "<generator>/<0_real|1_fake>/<file name>), an index for `collect`, and "
                                   "print a summary (images, requests, files, bytes, estimated input tokens). "
                                   "The files run unchanged on the OpenAI Batch API, on "
                                   "`vllm run-batch -i FILE -o OUT --model M`, and with `run`.")
    p.add_argument("--images", required=True, help="folder of images (walked recursively)")
    p.add_argument("--label", required=True, choices=sorted(LABELS), help="label of every image in the folder")
    p.add_argument("--generator", required=True, help="generator name (the MMFR folder evaluation_sets/NAME)")
    p.add_argument("--out", required=True, metavar="REQ_DIR", help="request folder (created)")
    p.add_argument("--prompt", help=f"prompt file (JSON: version, fake, real; default {DEFAULT_PROMPT_FILE})")
    p.add_argument("--model", default="gpt-4o", help="model name in every request body (default gpt-4o; "
                                                     "for vLLM the served model name)")
    p.add_argument("--max-tokens", type=_positive, default=1024, help="answer length limit (default 1024)")
    p.add_argument("--detail", choices=("low", "high", "auto"), default="high",
                   help="image detail of the requests (default high)")
    p.add_argument("--max-side", type=_positive,
                   help="downsize what is sent to at most this many pixels on its longer side "
                        "(the stored image is never changed; the index records the sent size)")
    p.add_argument("--max-requests-per-file", type=_positive, default=DEFAULT_MAX_REQUESTS,
                   help=f"requests per file at most (default {DEFAULT_MAX_REQUESTS}, the Batch API's limit)")
    p.add_argument("--max-bytes-per-file", type=parse_size, default=DEFAULT_MAX_BYTES,
                   help="bytes per file at most, e.g. 100M (default 200M, the Batch API's limit)")
    p.add_argument("--dry-run", action="store_true", help="print the summary, write nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="send request files to an OpenAI-compatible server (direct mode)",
                       description="Send request files to any OpenAI-compatible server (vLLM serve, "
                                   "llama.cpp, OpenAI itself) with a concurrency limit, retries with "
                                   "backoff on 429/5xx/timeouts, a timeout per request, and a resumable "
                                   "journal in the Batch output format (rerun the same command to resume; "
                                   "nothing answered is sent again).",
                       epilog="Exit status: 0 every request answered, 1 some failed after retries (listed "
                              "in the journal; `collect` reports them), 2 usage error.")
    p.add_argument("requests", nargs="+", metavar="REQUESTS", help="request files or request folders")
    p.add_argument("--endpoint", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--journal", required=True, help="journal file (created or resumed); give it to `collect`")
    p.add_argument("--concurrency", type=_positive, default=4, help="requests in flight at most (default 4)")
    p.add_argument("--max-attempts", type=_positive, default=6, help="tries per request (default 6)")
    p.add_argument("--timeout", type=_seconds, default=120.0,
                   help="seconds a request may wait for data from the server (default 120)")
    p.add_argument("--backoff", type=_seconds, default=1.0,
                   help="seconds before the first retry, doubled each retry, with jitter (default 1)")
    p.add_argument("--backoff-max", type=_seconds, default=60.0, help="longest wait between tries (default 60)")
    p.add_argument("--api-key-env", help="environment variable holding the API key (default OPENAI_API_KEY "
                                         "if set; the key is never written or printed)")
    p.add_argument("--model", help="replace the model name of every request (e.g. the name vLLM serves)")
    p.add_argument("--retry-errors", action="store_true", help="send again the requests that failed before")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _collect_parser(sub) -> None:
    p = sub.add_parser("collect", help="answers -> MMFR layout + annotate_report.json",
                       description="Read result files (Batch API output or error files, vllm run-batch "
                                   "output, `run` journals), parse each answer as strict JSON, and write "
                                   "evaluation_sets/<gen>/{0_real,1_fake}/<image> and "
                                   "<gen>_reasoning.json under MMFR_ROOT (merged with what is there), "
                                   "then print the report table. Shard the result with "
                                   "`bash launch/shard_mmfr.sh MMFR_ROOT OUT`.")
    p.add_argument("results", nargs="+", metavar="RESULTS", help="result files")
    p.add_argument("--requests", required=True, action="append", metavar="REQ_DIR",
                   help="request folder written by `requests` (repeat for several)")
    p.add_argument("--out", required=True, metavar="MMFR_ROOT", help="MMFR root to write into")
    p.add_argument("--copy", action="store_true", help="copy images (default: symlink them)")
    p.add_argument("--conversations", action="store_true",
                   help="also write LLaVA-CoT records into MMFR_ROOT/forgery_reasoning_cot.json")
    p.add_argument("--captions", metavar="FILE",
                   help="JSON object custom_id or file name -> caption for the <CAPTION> of the "
                        "conversations (default: the answers' \"Caption\")")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fakereasoning-annotate",
                                description="Grow MMFR with a new generator: reasoning annotations from any "
                                            "OpenAI-compatible engine (OpenAI Batch API, vllm run-batch, or "
                                            "a server in direct mode), collected into the MMFR layout.")
    sub = p.add_subparsers(dest="command", required=True)
    _requests_parser(sub)
    _run_parser(sub)
    _collect_parser(sub)
    return p


def _requests(a) -> int:
    s = build_requests(RequestsConfig(
        images=a.images, label=LABELS[a.label], generator=a.generator, out=a.out, prompt=a.prompt, model=a.model,
        max_tokens=a.max_tokens, detail=a.detail, max_side=a.max_side, max_requests_per_file=a.max_requests_per_file,
        max_bytes_per_file=a.max_bytes_per_file, dry_run=a.dry_run, progress=not a.no_progress))
    print(s.text())
    return 0


def _run(a) -> int:
    cfg = DirectConfig(requests=tuple(a.requests), endpoint=a.endpoint, journal=a.journal,
                       concurrency=a.concurrency, max_attempts=a.max_attempts, timeout=a.timeout,
                       backoff_base=a.backoff, backoff_max=a.backoff_max,
                       api_key_env=a.api_key_env or "OPENAI_API_KEY", require_api_key=a.api_key_env is not None,
                       model=a.model, retry_errors=a.retry_errors, progress=not a.no_progress)
    files, done, s = plan(cfg)
    print(f"{s.requests} requests in {s.files} files; {s.in_journal} already in {a.journal}; "
          f"sending {s.to_send} to {a.endpoint} ({a.concurrency} at a time)", flush=True)
    run_direct(cfg, files, done, s)
    print(f"answered {s.answered}, failed {s.failed} (after {s.retries} retries in all)")
    for line in s.failures[:20]:
        print(f"  failed: {line}")
    if s.failed:
        print(f"failed requests are listed in {a.journal}; rerun with --retry-errors to send them again")
    return 1 if s.failed else 0


def _collect(a) -> int:
    report = collect(CollectConfig(results=tuple(a.results), requests=tuple(a.requests), out=a.out, copy=a.copy,
                                   conversations=a.conversations, captions=a.captions))
    print(json.dumps(report, indent=1) if a.json else report_table(report))
    if not a.json:
        print(f"report: {a.out}/annotate_report.json (every rejection with its custom_id and reason)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return {"requests": _requests, "run": _run, "collect": _collect}[a.command](a)
    except (AnnotateError, PromptError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
