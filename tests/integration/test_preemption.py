"""Stop requests through the real `deepspeed` launcher, 2 ranks on CPU
(pipeline/training/preemption.py): a SIGTERM to the runner alone, to the whole
process group, to one rank, and a STOP file each end the job after the same
optimizer step on both ranks with a complete checkpoint, the PREEMPTED marker,
rank exit status 75 and no process left behind; `checkpoint.resume=auto` then
continues (checked after the STOP file) to the same losses and sample count
as an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from launch.local_run import REPO, TrainingJob, run_training

pytestmark = pytest.mark.slow

RECIPE = os.path.join(REPO, "launch", "recipes", "tiny-cpu.yaml")
STEPS = 30
TIMEOUT = 420


def _overrides(shards: Path, out: Path) -> list[str]:
    # No periodic checkpoint: the one a resume finds is the stop's own.
    return [f"data.train_shards={shards / 'train'}", "data.batch_size=4", "data.num_workers=1",
            "data.shuffle_buffer=50", "loop.grad_accum=2", f"loop.max_steps={STEPS}", "checkpoint.every_steps=0",
            "checkpoint.export=false", "wandb.mode=offline", "optim.lr=3e-3", "optim.warmup_steps=1",
            "preemption.poll_s=0.5", f"output_dir={out}"]


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _alive(pids: list[int]) -> list[str]:
    left = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {' '.join(p.cmdline()[:4])}")
        except psutil.NoSuchProcess:
            pass
    return left


def _stopped_run(shards: Path, out: Path, how: str) -> tuple[int, TrainingJob, list[int]]:
    """Start a job, wait for its third logged step, deliver the stop `how`; returns
    (the runner's exit status, the job, every pid of its tree at the time)."""
    job = TrainingJob(RECIPE, _overrides(shards, out), str(out) + ".log")
    try:
        job.wait_until("step 3", lambda: len(_metrics(out)) >= 3, TIMEOUT)
        tree = psutil.Process(job.pid).children(recursive=True)
        pids = [job.pid] + [p.pid for p in tree]
        if how == "runner":
            os.kill(job.pid, signal.SIGTERM)
        elif how == "group":
            job.kill_group(signal.SIGTERM)
        elif how == "rank":
            rank1 = [p for p in tree if "--local_rank=1" in p.cmdline() and "pt_data_worker" not in p.name()]
            assert rank1, [p.cmdline() for p in tree]
            os.kill(rank1[0].pid, signal.SIGTERM)
        elif how == "stop_file":
            (out / "STOP").touch()
        rc = job.wait(TIMEOUT)
    finally:
        job.kill_group(signal.SIGKILL)
    return rc, job, pids


# The runner's own status: killed by the SIGTERM itself (-15) when it was
# signalled, else the ranks' 75 passed up through the node launcher.
EXPECTED_RC = {"runner": -signal.SIGTERM, "group": -signal.SIGTERM, "rank": 75, "stop_file": 75}
REASON = {"runner": "the launcher is gone: the deepspeed runner", "group": "signal SIGTERM",
          "rank": "signal SIGTERM", "stop_file": "STOP exists"}


@pytest.fixture(scope="module")
def uninterrupted(mmfr_shards, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("preempt") / "whole"
    run_training(RECIPE, _overrides(mmfr_shards, out), str(out) + ".log", timeout=TIMEOUT)
    return _metrics(out)


@pytest.mark.parametrize("how", ["runner", "group", "rank", "stop_file"])
def test_stop_request_ends_with_a_checkpoint_and_resumes_exactly(how, mmfr_shards, uninterrupted, tmp_path):
    from pipeline.training.checkpoint_tags import complete_tags, tag_for

    out = tmp_path / how
    rc, job, pids = _stopped_run(mmfr_shards, out, how)
    log = job.log()
    assert rc == EXPECTED_RC[how], f"exit status {rc}:\n{log[-4000:]}"
    time.sleep(2)  # the node launcher reaps what is left within its own loop
    assert not _alive(pids), f"left behind after the stop: {_alive(pids)}"

    marker = json.loads((out / "PREEMPTED").read_text())
    step = marker["step"]
    assert marker["exit_status"] == 75 and marker["complete"] is True, marker
    assert 3 <= step < STEPS, marker
    assert any(REASON[how] in why for why in marker["requested_by_rank"].values()), marker
    assert complete_tags(str(out / "checkpoints")) == [tag_for(step)]
    # Every rank left after the same step and said so with status 75 where the launcher saw it.
    assert f"leaving the training loop after step {step}: a stop was requested" in log
    # A SIGTERM to the group also reaches the W&B service, which dies with it: its
    # client's teardown traceback is W&B's; any other traceback is ours.
    tracebacks = log.count("Traceback") - (log.count("Exception ignored in atexit callback: <function _start_and_connect_service")
                                         if how == "group" else 0)
    assert tracebacks == 0, log[-4000:]
    first = _metrics(out)
    assert [r["step"] for r in first] == list(range(1, step + 1))
    if how in ("rank", "stop_file"):
        assert "exits with return code = 75" in log
    if how != "stop_file":
        # The resume is checked once: the stop's checkpoint is the same whichever way
        # the request came (tests/integration/multinode/test_faults.py resumes a kill).
        return
    # A STOP file left over must not stop the resumed run: the marker and an old STOP are removed.
    run_training(RECIPE, _overrides(mmfr_shards, out) + ["checkpoint.resume=auto"], str(out) + "-resume.log",
                 timeout=TIMEOUT)
    assert not (out / "PREEMPTED").exists() and not (out / "STOP").exists()
    resumed = _metrics(out)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(resumed, uninterrupted):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5, abs=1e-6), (a["step"], a, b)
        assert a["train/samples_seen"] == b["train/samples_seen"], a["step"]
