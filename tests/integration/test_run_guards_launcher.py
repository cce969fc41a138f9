"""The run guards of issue 14 through the real `deepspeed` launcher (2 ranks, gloo, ZeRO-3, CPU).

  §2  one run per output_dir: a second launch into a folder held by a live run
      exits with status 2 naming the holder; the lock of a run killed with -9
      is taken over by the next one.
  §5  metrics history after a resume: the steps the killed run logged after its
      last checkpoint are dropped and trained again, so metrics.jsonl has one
      record per step; the W&B run continues under the same id.
  §3  disk full: a save that cannot fit is refused naming the folder, the
      estimate and the free space; with the check off (space_margin=0) a save
      that fills the disk fails naming the path, the free space and ENOSPC;
      keep_last pruning never deletes the previous checkpoint before the new
      one is complete.

Five launches in all (§2/§5: A, B (in parallel with A) and C; §3: two), each
~45-150 s on this 2-core machine depending on its load. Nothing is mocked.

Sizes (measured on the tiny-cpu recipe, data.batch_size=4, 2 ranks, fp32): one
complete checkpoint tag is 3,068,625 bytes (2.93 MiB: two 1,028,775-byte
model-state and two 503,305-byte optimizer-state files, plus COMPLETE); the
checkpoint folder adds ~42 KB (ds_config.json, zero_to_fp32.py, zero_to_torch.py,
the pointers). Before the first save the run estimates a checkpoint at ~5.0 MiB
(parameters 266,726 per rank x 4 B + 12 B per trainable element + 1 MiB per rank),
6.0 MiB with the default space_margin 1.2; after it, the measured 2.93 MiB.
So: a 2 MiB tmpfs holds no checkpoint at all (refusal and start-up warning), and a
4.5 MiB tmpfs holds exactly one (the second save runs out of space mid-write).
"""
from __future__ import annotations

import errno
import glob
import json
import os
import re
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from launch.local_run import REPO, TrainingJob, run_training
from launch.wandb_readback import _leet_inspect, read_offline_run
from pipeline.training import checkpoint_tags as tags
from sharding.dir_lock import LOCK_FILE

pytestmark = pytest.mark.slow

RECIPE = os.path.join(REPO, "launch", "recipes", "tiny-cpu.yaml")
LAUNCH_TIMEOUT = 600  # generous: other deepspeed jobs may share the 2 cores
MAX_STEPS = 40
EVERY = 4

CHECKPOINT_BYTES = 3_068_625  # measured, see the module docstring
NO_CHECKPOINT_TMPFS_K = 2048  # 2 MiB: less than one checkpoint (2.93 MiB) and than the estimate x 1.2 (6.0 MiB)
ONE_CHECKPOINT_TMPFS_K = 4608  # 4.5 MiB: one checkpoint + folder files (~3.1 MB) fit, a second (6.2 MB) does not


def _overrides(shards: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.train_shards={shards / 'train'}", "data.batch_size=4", "data.num_workers=1",
            "data.shuffle_buffer=50", "wandb.mode=offline", "optim.lr=3e-3", "optim.warmup_steps=1",
            "checkpoint.export=false", f"output_dir={out}", *extra]


def _metric_lines(out: Path) -> list[str]:
    path = out / "metrics.jsonl"
    return path.read_text().splitlines(keepends=True) if path.is_file() else []


def _steps(lines: list[str]) -> list[int]:
    steps = []
    for line in lines:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            pass  # a line cut by the kill
    return steps


def _past_checkpoint(out: Path) -> tuple[int, int] | None:
    """(newest complete checkpoint step s, last logged step m) once m > s >= EVERY."""
    tag = tags.newest_complete(str(out / "checkpoints"))
    s = tags.step_of(tag) if tag else None
    steps = _steps(_metric_lines(out))
    if s is not None and s >= EVERY and steps and steps[-1] >= s + 2:
        return s, steps[-1]
    return None


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _history_steps(run_dir: str) -> dict[int, dict]:
    """step -> history item of one offline W&B run segment (its "history" records)."""
    items: dict[int, dict] = {}
    order: list[int] = []
    for line in _leet_inspect(run_dir, ["--json"], 120).splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("type") == "history":
            item = rec["history"]["item"]
            order.append(int(item["_step"]))
            items[int(item["_step"])] = item
    assert order == sorted(set(order)), f"{run_dir}: W&B history steps repeated or out of order: {order}"
    return items


def test_second_run_refused_then_killed_run_taken_over_with_one_record_per_step(mmfr_shards, tmp_path):
    out = tmp_path / "run"
    ckpt_dir = out / "checkpoints"
    host = socket.gethostname()
    common = _overrides(mmfr_shards, out, f"loop.max_steps={MAX_STEPS}", f"checkpoint.every_steps={EVERY}",
                        "checkpoint.keep_last=2")
    a = TrainingJob(RECIPE, common, str(tmp_path / "A.log"))
    b = None
    try:
        # A holds the lock from right after the process group is up; B starts then, so its
        # rank 0 reaches the lock while A is still setting up or training.
        a.wait_until("A's run.lock", lambda: (out / LOCK_FILE).is_file(), LAUNCH_TIMEOUT)
        b = TrainingJob(RECIPE, common, str(tmp_path / "B.log"))
        rc_b = b.wait(LAUNCH_TIMEOUT)
        log_b = b.log()
        assert a.proc.poll() is None, f"A ended before B was refused; the refusal proves nothing:\n{a.log()[-3000:]}"
        assert rc_b == 2, f"B exited with {rc_b}, expected 2 (output_dir held):\n{log_b[-4000:]}"
        m = re.search(r"rank 0/2: .*host (\S+), pid (\d+)", a.log())
        assert m, a.log()[-3000:]
        assert m.group(1) == host
        pid_a = int(m.group(2))
        assert f"{out} is in use by training on host {host}, pid {pid_a}, started " in log_b, log_b[-4000:]
        assert f"(lock file {out / LOCK_FILE})" in log_b
        assert not glob.glob(str(out / "wandb" / "offline-run-*"))[1:], "B must not have started a W&B run"

        # Kill all of A with -9 once it has logged steps past a complete checkpoint.
        a.wait_until("A's metrics past a complete checkpoint", lambda: _past_checkpoint(out), LAUNCH_TIMEOUT)
        procs = [psutil.Process(a.pid)] + psutil.Process(a.pid).children(recursive=True)
        a.kill_group(signal.SIGKILL)
        assert a.wait(60) == -signal.SIGKILL
        deadline = time.monotonic() + 60
        while any(_alive(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.5)
        survivors = [(p.pid, p.name()) for p in procs if _alive(p)]
        assert not survivors, f"processes of A survived kill -9 of its group: {survivors}"
    finally:
        for job in (a, b):
            if job is not None and job.proc.poll() is None:
                job.kill_group(signal.SIGKILL)
                job.proc.wait()

    # What A left: a stale lock naming its dead rank 0, a newest complete checkpoint s,
    # and records of steps after s.
    stale = json.loads((out / LOCK_FILE).read_text())
    assert stale["pid"] == pid_a and stale["host"] == host
    s = tags.step_of(tags.newest_complete(str(ckpt_dir)))
    a_lines = _metric_lines(out)
    a_steps = _steps(a_lines)
    assert a_steps[:s] == list(range(1, s + 1))
    past = len(a_lines) - s
    assert past >= 2 and a_steps[-1] > s, (s, a_steps)
    assert s < MAX_STEPS

    # C continues in the same folder: takes over the stale lock, drops A's steps after s, trains them again.
    run_training(RECIPE, common + ["checkpoint.resume=auto"], str(tmp_path / "C.log"), timeout=LAUNCH_TIMEOUT)
    log_c = (tmp_path / "C.log").read_text()
    assert (f"took over the lock {out / LOCK_FILE}: the previous holder (training on host {host}, pid {pid_a}, "
            in log_c), log_c[-4000:]
    assert f"is gone: its process {pid_a} on this host is dead" in log_c
    assert f"resumed from {ckpt_dir / tags.tag_for(s)} at step {s}" in log_c
    assert f"dropped {past} records past step {s}" in log_c
    c_lines = _metric_lines(out)
    assert _steps(c_lines) == list(range(1, MAX_STEPS + 1)), "one record per step, in order"
    assert len(c_lines) == MAX_STEPS
    assert c_lines[:s] == a_lines[:s], "the records up to the checkpoint are A's, untouched"
    assert not (out / LOCK_FILE).exists(), "C releases the lock when it ends"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == MAX_STEPS and summary["steps_this_run"] == MAX_STEPS - s

    # W&B: two offline segments of one run id. Each segment holds each step at most once;
    # C's holds exactly s+1..MAX_STEPS with the values of metrics.jsonl. A's values for the
    # steps it logged past s (the ones W&B keeps once the segments are synced: a resumed run
    # cannot log below its step) equal C's retrained ones: the resume is exact.
    info = json.loads((out / "run_info.json").read_text())
    segments = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))
    assert len(segments) == 2, segments
    c_dir = info["wandb_run_dir"]
    assert c_dir in segments
    a_dir = next(d for d in segments if d != c_dir)
    c_run = read_offline_run(c_dir)
    assert c_run["run_id"] == info["wandb_run_id"] and a_dir.endswith(info["wandb_run_id"]), (c_run, a_dir)
    assert c_run["state"] == "finished" and c_run["step"] == MAX_STEPS
    # A's segment, killed with -9, is not readable back offline (its history records were
    # still buffered in the W&B service); C's is, and holds each resumed step once.
    c_hist = _history_steps(c_dir)
    assert sorted(c_hist) == list(range(s + 1, MAX_STEPS + 1)), sorted(c_hist)
    records = {r["step"]: r for r in map(json.loads, c_lines)}
    for step, item in c_hist.items():
        assert item["train/loss"] == pytest.approx(records[step]["train/loss"], rel=1e-6), step


# --------------------------------------------------------------------------- §3 disk full


@contextmanager
def _tmpfs(path: Path, size_k: int):
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_k}k", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        text = (res.stderr + res.stdout).lower()
        if "permission denied" in text or "not permitted" in text or "must be superuser" in text:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip()}")
        raise RuntimeError(f"mount -t tmpfs failed ({res.returncode}): {res.stderr}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _run_failing(overrides: list[str], log_path: Path) -> str:
    job = TrainingJob(RECIPE, overrides, str(log_path))
    try:
        rc = job.wait(LAUNCH_TIMEOUT)
    finally:
        if job.proc.poll() is None:
            job.kill_group(signal.SIGKILL)
            job.proc.wait()
    text = job.log()
    assert rc != 0, f"the run should have failed:\n{text[-4000:]}"
    return text


def test_a_checkpoint_that_cannot_fit_is_refused(mmfr_shards, tmp_path):
    out, disk = tmp_path / "run", tmp_path / "disk"
    with _tmpfs(disk, NO_CHECKPOINT_TMPFS_K):
        ck = disk / "checkpoints"
        text = _run_failing(_overrides(mmfr_shards, out, "loop.max_steps=2", "checkpoint.every_steps=1",
                                       f"checkpoint.dir={ck}", "wandb.mode=disabled"), tmp_path / "refused.log")
        num = r"(\d+\.\d) MiB"
        problem = (rf"a checkpoint of this run needs about {num} \({num} with checkpoint\.space_margin=1\.2\) "
                   rf"but the file system of {re.escape(str(ck))} has {num} free")
        warn = re.search(r"the next checkpoint save will be refused unless space is freed: " + problem, text)
        assert warn, f"no start-up warning:\n{text[-4000:]}"
        refused = re.search(r"refusing to start the checkpoint save: " + problem, text)
        assert refused, f"no refusal naming the folder, the estimate and the free space:\n{text[-4000:]}"
        estimate, needed, free = map(float, refused.groups())
        assert estimate * 2**20 >= CHECKPOINT_BYTES * 0.9, "the estimate must not undercount a real checkpoint"
        assert needed == pytest.approx(estimate * 1.2, abs=0.11)
        assert free <= NO_CHECKPOINT_TMPFS_K / 1024 < needed
        assert "CheckpointSpaceError" in text
        # Refused before anything was written: no tag folder at all, nothing complete.
        assert not glob.glob(str(ck / "global_step*")), os.listdir(ck)
        assert tags.complete_tags(str(ck)) == [] and not (ck / tags.POINTER).exists()
        assert not (out / LOCK_FILE).exists(), "the lock is released when the run fails"


def test_disk_full_during_a_save_names_enospc_and_keeps_the_previous_checkpoint(mmfr_shards, tmp_path):
    out, disk = tmp_path / "run", tmp_path / "disk"
    with _tmpfs(disk, ONE_CHECKPOINT_TMPFS_K):
        ck = disk / "checkpoints"
        # space_margin=0: no check; the first save fits, the second fills the disk mid-write.
        # keep_last=1 would delete global_step1 once global_step2 is complete, never before.
        text = _run_failing(_overrides(mmfr_shards, out, "loop.max_steps=3", "checkpoint.every_steps=1",
                                       "checkpoint.keep_last=1", "checkpoint.space_margin=0",
                                       f"checkpoint.dir={ck}", "wandb.mode=disabled"), tmp_path / "enospc.log")
        assert "the next checkpoint save will be refused" not in text and "refusing to start" not in text
        m = re.search(rf"saving checkpoint {re.escape(str(ck / 'global_step2'))} failed: No space left on device "
                      rf"\(ENOSPC\); (\d+\.\d) MiB free on its file system now; the newest complete checkpoint is "
                      rf"untouched \(no pruning happened\)", text)
        assert m, f"no ENOSPC message naming the path and the free space:\n{text[-5000:]}"
        assert float(m.group(1)) < ONE_CHECKPOINT_TMPFS_K / 1024 - CHECKPOINT_BYTES / 2**20
        assert f"[Errno {errno.ENOSPC}]" in text or "CheckpointSpaceError" in text
        # The first checkpoint is still complete, pointed to, and has every file its marker lists.
        assert tags.complete_tags(str(ck)) == ["global_step1"]
        assert tags.newest_complete(str(ck)) == "global_step1"
        assert (ck / tags.POINTER).read_text().strip() == "global_step1"
        marker = json.loads((ck / "global_step1" / tags.COMPLETE).read_text())
        assert marker["global_step"] == 1 and len(marker["files"]) >= 4
        for name, size in marker["files"].items():
            assert os.path.getsize(ck / "global_step1" / name) == size, name
        assert tags.checkpoint_bytes(str(ck), "global_step1") == pytest.approx(CHECKPOINT_BYTES, rel=0.05)
        assert not tags.is_complete(str(ck), "global_step2")
        assert not (out / LOCK_FILE).exists()
