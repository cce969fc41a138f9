"""The direct mode (`fakereasoning-annotate run`) against a small OpenAI-compatible
server on 127.0.0.1 that answers from a table, sometimes with 429 or 500, and
once not at all: every request ends answered or listed in the journal, and a
run killed with SIGKILL and started again never sends an answered request twice."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "unit" / "sharding"))  # the annotate test helpers
from _annotate_fixtures import ChatServer, answer, write_images  # noqa: E402
from sharding.annotate.collect import CollectConfig, collect  # noqa: E402
from sharding.annotate.requests import RequestsConfig, build_requests  # noqa: E402

SECRET = "sk-test-value-that-must-never-be-written"


def _sha(p: Path) -> str:
    import hashlib
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _journal_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [json.loads(x)["custom_id"] for x in path.read_bytes().split(b"\n")[:-1]]


@pytest.mark.slow
def test_direct_mode_retries_lists_failures_and_resumes_without_resending(tmp_path):
    imgs = write_images(tmp_path / "imgs", 12)
    req = tmp_path / "req"
    build_requests(RequestsConfig(str(tmp_path / "imgs"), 1, "gen", str(req), progress=False))
    ident = {p.name: _sha(p) for p in imgs}
    table = {ident[f"img{i}.png"]: answer(1) for i in range(12) if i != 4}  # img4 unknown: HTTP 400
    faults = {ident["img0.png"]: ["429"], ident["img1.png"]: ["500", "500"], ident["img2.png"]: ["hang"],
              ident["img3.png"]: ["500"] * 20}  # img3 never succeeds
    journal = tmp_path / "journal.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "FR_TEST_KEY": SECRET}
    with ChatServer(table, faults, delay_s=0.25, hang_s=3.0) as server:
        cmd = [sys.executable, "-m", "sharding.annotate", "run", str(req), "--endpoint", server.url + "/v1",
               "--journal", str(journal), "--concurrency", "2", "--max-attempts", "3", "--timeout", "1.0",
               "--backoff", "0.05", "--backoff-max", "0.2", "--api-key-env", "FR_TEST_KEY", "--no-progress"]
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while len(_journal_ids(journal)) < 4 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        done_before = set(_journal_ids(journal))
        assert 4 <= len(done_before) < 12, done_before  # killed mid-run
        seen_before = len(server.log)

        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        out = second.stdout + second.stderr
        assert second.returncode == 1, out  # img3 failed after its retries
        assert f"{len(done_before)} already in" in out and "answered " in out

        # a kill and a rerun send no answered request again
        resent = {i for i, _ in server.log[seen_before:]}
        by_ident = {v: k for k, v in ident.items()}
        assert not resent & {ident[c.rsplit("/", 1)[1]] for c in done_before}, \
            sorted(by_ident[i] for i in resent)
        # every request ends answered or listed, exactly once in the journal
        lines = [json.loads(x) for x in journal.read_text().splitlines()]
        assert sorted(x["custom_id"] for x in lines) == sorted(f"gen/1_fake/img{i}.png" for i in range(12))
        status = {x["custom_id"].rsplit("/", 1)[1]: (x["response"] or {}).get("status_code") for x in lines}
        errors = {x["custom_id"].rsplit("/", 1)[1]: x["error"] for x in lines if x["error"]}
        assert set(errors) == {"img3.png"} and "3 tries, last: HTTP 500" in errors["img3.png"]["message"]
        assert status["img4.png"] == 400
        assert all(status[f"img{i}.png"] == 200 for i in range(12) if i not in (3, 4))
        # the retried ones: a 429, two 500s, and a silence that ran into the timeout
        log = [(by_ident[i], what) for i, what in server.log]
        assert ("img0.png", "429") in log and log.count(("img1.png", "500")) == 2
        assert ("img2.png", "hang") in log and ("img2.png", "200") in log
        # 3 tries in the rerun, after the 0 to 2 the killed run had made
        assert 3 <= log.count(("img3.png", "500")) <= 5
        # the key went to the server only
        assert set(server.auth) == {f"Bearer {SECRET}"}
        assert SECRET not in out and SECRET not in journal.read_text()

        n = len(server.log)
        third = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert "sending 0" in third.stdout and len(server.log) == n

    report = collect(CollectConfig((str(journal),), (str(req),), str(tmp_path / "mmfr")))
    (group,) = report["groups"]
    assert (group["requests"], group["kept"], group["rejected"]) == (12, 10, {"error_line": 1, "http_status": 1})
