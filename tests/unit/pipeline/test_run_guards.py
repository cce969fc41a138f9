"""Guards of a training run that need no engine: one run per output_dir (the lock
file), the free-space check before a save, and metrics.jsonl after a resume."""
import json
import os
import subprocess
import sys

import pytest

from pipeline.training import checkpoint_space as space
from pipeline.training import checkpointing as ckpt
from sharding.dir_lock import LOCK_FILE, OutputLocked, acquire, read_holder


def test_a_live_lock_refuses_a_second_run_naming_the_holder(tmp_path):
    path = str(tmp_path / LOCK_FILE)
    lock = acquire(path, "training", refresh_s=0.2, stale_after_s=5)
    try:
        # A second process (a second run) is refused while the first is alive.
        code = (f"from sharding.dir_lock import acquire, OutputLocked\n"
                f"try:\n    acquire({path!r}, 'training', refresh_s=0.2, stale_after_s=5)\n"
                f"except OutputLocked as e:\n    print(e); raise SystemExit(2)\n")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert res.returncode == 2, res.stderr
        assert f"pid {os.getpid()}" in res.stdout and "training" in res.stdout
    finally:
        lock.release()
    assert not os.path.exists(path)  # released: the next run may start


def test_a_lock_of_a_dead_process_is_taken_over(tmp_path):
    path = str(tmp_path / LOCK_FILE)
    res = subprocess.run([sys.executable, "-c", f"from sharding.dir_lock import acquire; "
                          f"acquire({path!r}, 'training', refresh_s=0, stale_after_s=600); import os; os._exit(0)"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    dead = read_holder(path)
    assert dead is not None and dead.pid != os.getpid()
    lock = acquire(path, "training", refresh_s=0, stale_after_s=600)  # same host, dead pid: stale at once
    try:
        assert read_holder(path).pid == os.getpid()
    finally:
        lock.release()


def test_second_acquire_in_the_same_folder_is_refused(tmp_path):
    path = str(tmp_path / LOCK_FILE)
    lock = acquire(path, "training", refresh_s=0, stale_after_s=600)
    try:
        with pytest.raises(OutputLocked, match="in use by training"):
            acquire(path, "training", refresh_s=0, stale_after_s=600)
    finally:
        lock.release()


def test_a_save_that_cannot_fit_is_named_with_path_and_free_space(tmp_path):
    free = space.free_bytes(str(tmp_path))
    assert space.space_problem(str(tmp_path / "checkpoints"), 1024, 1.2) is None
    problem = space.space_problem(str(tmp_path / "checkpoints"), free * 2, 1.2)
    assert problem is not None and str(tmp_path / "checkpoints") in problem and "MiB free" in problem
    assert space.space_problem(str(tmp_path), free * 2, 0) is None  # margin 0 turns the check off


def test_estimate_counts_parameters_and_optimizer_state_per_rank():
    est = space.estimate_checkpoint_bytes([100, 100], [10, 10], 2)
    assert est == 2 * (100 * 2 + 10 * space.OPTIMIZER_BYTES_PER_TRAINABLE + space.PER_RANK_OVERHEAD_BYTES)


def test_a_failed_save_names_the_path_and_enospc(tmp_path):
    err = space.save_failure(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
                             str(tmp_path / "global_step3"), None)
    assert "No space left on device (ENOSPC)" in str(err) and str(tmp_path / "global_step3") in str(err)
    assert "free on its file system" in str(err)


def test_metrics_past_the_checkpoint_are_dropped_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    steps = [1, 2, 3, 4, 5]
    path.write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in steps) + '{"step": 6, "tr')
    assert ckpt.drop_metrics_after(str(path), 3) == 3  # 4, 5 and the line cut by the kill
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert ckpt.drop_metrics_after(str(path), 3) == 0
    assert ckpt.drop_metrics_after(str(tmp_path / "absent.jsonl"), 3) == 0


def test_a_save_that_cannot_fit_is_refused_before_anything_is_written(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    with pytest.raises(space.CheckpointSpaceError, match="refusing to start the checkpoint save") as e:
        space.check_space_everywhere(str(ckpt_dir), space.free_bytes(str(tmp_path)) * 2, 1.2, is_main=True)
    assert e.value.errno == 28 and str(ckpt_dir) in str(e.value)
    assert not ckpt_dir.exists()
    space.check_space_everywhere(str(ckpt_dir), 1024, 1.2, is_main=True)  # fits: no error
