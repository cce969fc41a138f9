"""What happens when something dies or breaks, on real launches.

The runs train the shared job (conftest.job_overrides), so they are comparable
step by step with the uninterrupted one-node run `reference_run`, which itself
runs with W&B unreachable:

  kill chain, on the two loopback hosts through pdsh:
    F1  SIGKILL of rank 1 (on 127.0.0.3) in the middle of step 4, after the
        step-2 checkpoint: the job must end, non-zero, in bounded time.
    F2  --resume auto (from step 2), with rank 1 held inside save_checkpoint of
        step 4 and SIGKILLed there: a half-written global_step4 is left behind.
    F3  --resume auto again: must start from step 2, never from the half-written
        step 4, and reproduce the reference's losses and weights.
  damaged  the job on a shard set with three undecodable images and a shard cut
        in half (conftest.damaged_shards): counted and tolerated, then stopped.
  universal  the reference's step-2 checkpoint (2 ranks) converted with
        DeepSpeed's ds_to_universal into `global_step2_universal` next to it and
        resumed on 1 rank with checkpoint.resume=<that folder>, nothing else.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.wandb_readback import read_offline_run

pytestmark = pytest.mark.slow

# gloo sees a dead peer's closed socket at once and DeepSpeed's node launcher polls
# every second, then gives the other ranks up to 30 s to terminate: 60 s is the bound
# asserted for a dead rank. (A hung but living rank is bounded by the collective timeout.)
DEAD_RANK_EXIT_S = 60


def _wait_for(predicate, timeout: float, what: str, run=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if run is not None and run.proc.poll() is not None:
            raise AssertionError(f"the launch ended ({run.proc.returncode}) before {what}:\n{run.text()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" +
                         (f":\n{run.text()[-4000:]}" if run is not None else ""))


def _last_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, json.JSONDecodeError, IndexError):
        return 0


def _fp32_state(ckpt_dir: Path, tag: str) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b) and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def kill_chain(two_host_launch, job_data, job, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("kill-chain")
    out = base / "out"
    ckpt = out / "checkpoints"
    overrides = job.overrides(job_data["shards"], out, job_data["tokenizer"])
    res: dict = {"out": out, "ckpt": ckpt}

    # F1: stop rank 0 once it has logged step 3, so that rank 1 is certainly inside
    # step 4 (it cannot finish it without rank 0), SIGKILL rank 1, let rank 0 go on.
    f1 = two_host_launch(overrides, base, "F1")
    _wait_for(lambda: _last_step(out) >= 3, job.timeout, "step 3", f1)
    r0, r1 = f1.rank_pid(0), f1.rank_pid(1)
    assert r0 and r1, "rank processes not found"
    res["f1_complete_before_kill"] = sorted(p.name for p in ckpt.glob("global_step*/COMPLETE"))
    os.kill(r0, signal.SIGSTOP)
    time.sleep(0.5)
    os.kill(r1, signal.SIGKILL)
    killed = time.monotonic()
    os.kill(r0, signal.SIGCONT)
    res["f1_rc"] = f1.wait(timeout=DEAD_RANK_EXIT_S * 2)
    res["f1_exit_s"] = time.monotonic() - killed
    res["f1_log"] = f1.text()
    res["f1_tags"] = sorted(p.name for p in ckpt.glob("global_step*"))

    # F2: hold rank 1 inside save_checkpoint of step 4. Its optimizer-state file is
    # made a FIFO beforehand: open() for writing blocks until a reader comes, and
    # none does, so rank 1 is stuck mid-save while rank 0 has written its part.
    tag4 = ckpt / f"global_step{job.steps}"
    tag4.mkdir(parents=True)
    fifo = tag4 / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    os.mkfifo(fifo)
    f2 = two_host_launch(overrides + ["checkpoint.resume=auto"], base, "F2")
    _wait_for(lambda: (tag4 / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file(), job.timeout,
              "rank 0's part of the step-4 checkpoint", f2)
    time.sleep(1.0)
    r1 = f2.rank_pid(1)
    assert r1, "rank 1 not found during the save"
    res["f2_rank1_wchan"] = Path(f"/proc/{r1}/wchan").read_text()
    os.kill(r1, signal.SIGKILL)
    killed = time.monotonic()
    res["f2_rc"] = f2.wait(timeout=DEAD_RANK_EXIT_S * 2)
    res["f2_exit_s"] = time.monotonic() - killed
    res["f2_log"] = f2.text()
    res["f2_tag4_files"] = sorted(p.name for p in tag4.iterdir())
    latest = ckpt / "latest"
    res["f2_deepspeed_latest"] = latest.read_text().strip() if latest.is_file() else None
    res["f2_pointer"] = (ckpt / "latest_complete").read_text().strip()

    # F3: the FIFO was only the means of holding rank 1; the partial files stay.
    fifo.unlink()
    f3 = two_host_launch(overrides + ["checkpoint.resume=auto"], base, "F3")
    res["f3_rc"] = f3.wait()
    res["f3_log"] = f3.text()
    return res


def test_sigkill_mid_step_ends_the_job_in_bounded_time(kill_chain):
    r = kill_chain
    assert r["f1_complete_before_kill"] == ["COMPLETE"], "the step-2 checkpoint should be complete before the kill"
    assert r["f1_rc"] != 0, r["f1_log"][-3000:]
    assert r["f1_exit_s"] <= DEAD_RANK_EXIT_S, f"job took {r['f1_exit_s']:.0f}s to end after the kill"
    # The launcher names the dead rank: the node launcher on 127.0.0.3 (node 1, its only
    # rank, global rank 1) reports return code -9 = SIGKILL, and pdsh names the host.
    lines = r["f1_log"].splitlines()
    assert any(l.startswith("127.0.0.3: ") and "exits with return code = -9" in l for l in lines), \
        r["f1_log"][-3000:]
    assert any("127.0.0.3: ssh exited with exit code" in l for l in lines)
    assert "global_step4" not in r["f1_tags"], "no step-4 checkpoint may exist after a kill inside step 4"


def test_kill_during_save_checkpoint_is_never_resumed_from(kill_chain, job):
    r = kill_chain
    assert r["f2_rc"] != 0 and r["f2_exit_s"] <= DEAD_RANK_EXIT_S, (r["f2_rc"], r["f2_exit_s"])
    # Linux parks a writer opening a FIFO with no reader in wait_for_partner (fifo_open).
    assert r["f2_rank1_wchan"] in ("wait_for_partner", "fifo_open"), \
        f"rank 1 should be blocked opening its checkpoint file, wchan={r['f2_rank1_wchan']}"
    assert "resumed from" in r["f2_log"] and f"global_step{job.every} at step {job.every}" in r["f2_log"]
    # Rank 0 wrote its half of step 4 and nothing marked it complete.
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in r["f2_tag4_files"]
    assert "COMPLETE" not in r["f2_tag4_files"]
    assert r["f2_pointer"] == f"global_step{job.every}", (r["f2_pointer"], r["f2_deepspeed_latest"])
    # --resume auto took step 2 again, whatever DeepSpeed's own `latest` said.
    assert r["f3_rc"] == 0, r["f3_log"][-4000:]
    resumed = [l for l in r["f3_log"].splitlines() if "resumed from" in l]
    assert resumed and all(f"global_step{job.every} at step {job.every}" in l for l in resumed), resumed


def test_resume_after_the_kills_matches_the_uninterrupted_run(kill_chain, reference_run, job):
    r = kill_chain
    assert r["f3_rc"] == 0, r["f3_log"][-4000:]
    ref = {m["step"]: m for m in job.metrics(reference_run["out"])}
    got = {m["step"]: m for m in job.metrics(r["out"])}  # appended by each launch: the last one wins
    assert sorted(got) == sorted(ref) == list(range(1, job.steps + 1))
    for step in range(job.every + 1, job.steps + 1):
        assert got[step]["train/loss"] == pytest.approx(ref[step]["train/loss"], rel=1e-4, abs=1e-5), step
        assert got[step]["train/samples_seen"] == ref[step]["train/samples_seen"], step
    a = json.loads((r["out"] / "train_summary.json").read_text())
    b = json.loads((reference_run["out"] / "train_summary.json").read_text())
    assert a["samples_seen"] == b["samples_seen"] and a["global_step"] == b["global_step"] == job.steps
    tag = f"global_step{job.steps}"
    worst = _max_diff(_fp32_state(r["ckpt"], tag), _fp32_state(reference_run["out"] / "checkpoints", tag))
    assert worst <= 1e-5, worst


# --------------------------------------------------------------------------- bad shards

@pytest.fixture(scope="module")
def damaged_run(damaged_shards, job_data, job, tmp_path_factory) -> dict:
    """The job on the damaged shards, one node, 2 ranks, allowed up to 12 steps:
    the zeroed images come first (tolerated: 3 bad samples, and the fraction is
    checked only from the 16th read on, so at most 3/16 < 30%), then the cut,
    after which every sample of that shard is bad. Spares come from the intact
    shards, so past the cut one read in two is bad: the fraction crosses 30%
    around rank 1's ~60th read (step ~7) and stops the run. (It would never reach
    50%, and peaks near 39% when the dead shard's promised samples run out.)"""
    from launch.local_run import run_training

    base = tmp_path_factory.mktemp("damaged-run")
    out = base / "out"
    overrides = job.overrides(damaged_shards["dir"], out, job_data["tokenizer"]) + [
        "loop.max_steps=12", "data.max_bad_fraction=0.3", "data.bad_check_min_samples=16",
        "data.bad_log_interval_s=0", "wandb.mode=offline"]
    t0 = time.monotonic()
    try:
        run_training(job.recipe, overrides, str(base / "train.log"), timeout=job.timeout)
        error = None
    except RuntimeError as e:
        error = str(e)
    return {"out": out, "log": (base / "train.log").read_text(errors="replace"), "error": error,
            "seconds": time.monotonic() - t0}


def test_bad_samples_are_counted_and_training_goes_on(damaged_run, damaged_shards):
    m = [json.loads(l) for l in (damaged_run["out"] / "metrics.jsonl").read_text().splitlines()]
    counted = [x["step"] for x in m if x.get("train/bad_samples", 0) > 0]
    assert counted, "the zeroed images were not counted as bad samples in any step"
    # Training went on after the first bad samples.
    assert m[-1]["step"] > counted[0], (counted, m[-1]["step"])
    named = [l for l in damaged_run["log"].splitlines() if "bad sample" in l and damaged_shards["victim"] in l]
    assert named, "no log line names the damaged shard"
    info = json.loads((damaged_run["out"] / "run_info.json").read_text())
    summary = read_offline_run(info["wandb_run_dir"])["summary"]
    assert "train/bad_samples" in summary, sorted(summary)


def test_a_truncated_shard_stops_training_naming_the_shard(damaged_run, damaged_shards):
    assert damaged_run["error"] is not None and "exited with" in damaged_run["error"], \
        "training went on through a shard truncated at half its samples"
    stops = [l for l in damaged_run["log"].splitlines()
             if "RuntimeError" in l and damaged_shards["victim"] in l
             and "exceeds data.max_bad_fraction=0.3" in l]
    assert stops, damaged_run["log"][-4000:]
    assert not (damaged_run["out"] / "train_summary.json").exists()


# --------------------------------------------------------------------------- W&B unreachable

def test_wandb_unreachable_training_finishes_and_the_run_stays_offline(reference_run, job):
    out = reference_run["out"]
    info = json.loads((out / "run_info.json").read_text())
    assert info["wandb_mode"] == "offline", info["wandb_mode"]
    assert os.path.basename(info["wandb_run_dir"]).startswith("offline-run-")
    log = reference_run["log"].read_text(errors="replace")
    assert "W&B init in online mode failed" in log and reference_run["wandb_base_url"].split("//")[1] in log
    s = read_offline_run(info["wandb_run_dir"])
    assert s["state"] == "finished" and s["step"] == job.steps and s["run_id"] == info["wandb_run_id"]
    # Kept for a later `wandb sync <run dir>`: the run's transaction log is there.
    assert list(Path(info["wandb_run_dir"]).glob("run-*.wandb"))
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == job.steps


# --------------------------------------------------------------------------- different number of ranks

def _to_universal(src: Path, dst: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
                           "--output_folder", str(dst), "--num_extract_workers", "1", "--num_merge_workers", "1"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_resume_on_one_rank_from_a_two_rank_checkpoint_via_universal(reference_run, job_data, job, tmp_path):
    """2 ranks -> universal checkpoint -> 1 rank. The 1-rank job is resumed at the
    checkpoint's own step (max_steps = that step) so that its final save holds
    exactly the state it loaded: weights and Adam moments must equal the 2-rank
    checkpoint's, parameter by parameter."""
    import torch

    from launch.local_run import run_training

    ref_ckpt = reference_run["out"] / "checkpoints"
    tag = f"global_step{job.every}"
    # A checkpoint folder of this test's own holding the reference's complete tag:
    # ds_to_universal writes `latest_universal` into the folder above its output,
    # and the session's reference run stays untouched for the other tests.
    src_ckpt = tmp_path / "checkpoints"
    src_ckpt.mkdir()
    shutil.copytree(ref_ckpt / tag, src_ckpt / tag)
    shutil.copy2(ref_ckpt / "ds_config.json", src_ckpt / "ds_config.json")
    # The one documented step: convert next to the source, DeepSpeed's naming
    # (`global_stepN_universal`). No COMPLETE copy, no DeepSpeed JSON: the
    # folder's source marker proves it complete and load_universal is switched on.
    universal = src_ckpt / f"{tag}_universal"
    _to_universal(src_ckpt / tag, universal)
    assert not (universal / "COMPLETE").exists()
    out = tmp_path / "one-rank"
    # loop.global_batch keeps the 2-rank job's 8 (4 x 1 x 2) on one rank: accumulation 2.
    overrides = job.overrides(job_data["shards"], out, job_data["tokenizer"]) + [
        f"loop.max_steps={job.every}", f"checkpoint.resume={universal}", "wandb.mode=offline",
        "loop.global_batch=8", "loop.grad_accum=null"]
    run_training(job.recipe, overrides, str(tmp_path / "one-rank.log"), num_ranks=1, timeout=job.timeout)
    log = (tmp_path / "one-rank.log").read_text(errors="replace")
    assert f"resumed from {universal} at step {job.every}" in log
    assert "(DeepSpeed universal checkpoint)" in log, "the folder was not detected as a universal checkpoint"
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 1
    assert (info["global_batch"], info["grad_accum"]) == (8, 2)
    assert ("resuming on 1 rank(s) a checkpoint written by 2: global batch 8 kept (loop.global_batch); "
            "micro-batch 4 x accumulation 2 x 1 (was 4 x 1 x 2)") in log
    # Weights: the 1-rank checkpoint vs the 2-rank one.
    worst = _max_diff(_fp32_state(out / "checkpoints", tag), _fp32_state(src_ckpt, tag))
    assert worst == 0.0, f"weights changed through the universal round trip by {worst}"
    # Optimizer state: convert the 1-rank checkpoint too and compare the merged moments.
    again = tmp_path / "again_universal"
    _to_universal(out / "checkpoints" / tag, again)
    params = sorted(p.name for p in (universal / "zero").iterdir() if p.is_dir())
    assert params and params == sorted(p.name for p in (again / "zero").iterdir() if p.is_dir())
    for name in params:
        for state in ("fp32", "exp_avg", "exp_avg_sq"):
            a = torch.load(universal / "zero" / name / f"{state}.pt", weights_only=False)
            b = torch.load(again / "zero" / name / f"{state}.pt", weights_only=False)
            a, b = (x["param"] if isinstance(x, dict) else x for x in (a, b))
            assert torch.equal(a, b), (name, state)
