"""W&B tracking never stops training: mode resolution, rank 0 only, fallbacks."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from pipeline.tracking import WandbConfig
from launch.wandb_readback import read_offline_run, read_offline_run_record
from pipeline.tracking import experiment_group, resolve_mode
from pipeline.tracking import start_tracking, start_train_tracking


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    for k in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR",
              "WANDB_SERVICE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc-absent"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def test_auto_mode_is_offline_without_credentials(no_credentials, monkeypatch):
    assert resolve_mode("auto") == "offline"
    (no_credentials / "netrc").write_text("machine api.wandb.ai login user password abc\n")
    monkeypatch.setenv("NETRC", str(no_credentials / "netrc"))
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"
    assert resolve_mode("offline") == "offline", "an explicit mode wins"


def test_disabled_and_other_ranks_do_nothing(no_credentials):
    t = start_tracking(WandbConfig(mode="disabled"), str(no_credentials), {}, is_main=True)
    assert not t.active and t.run_id
    t.log({"train/loss": 1.0}, step=1)
    t.finish()
    other = start_tracking(WandbConfig(mode="offline"), str(no_credentials), {}, is_main=False, run_id="abc")
    assert not other.active and other.run_id == "abc"
    assert not (no_credentials / "wandb").exists(), "only global rank 0 writes a run"


def test_training_group_is_derived_and_an_explicit_group_wins(no_credentials):
    out = str(no_credentials / "runs" / "exp1")
    train = start_train_tracking(WandbConfig(mode="disabled"), out, {}, out, is_main=True)
    assert train.group == experiment_group(out, train.run_id) == f"exp1-{train.run_id}"
    assert train.record() == {"wandb_mode": "disabled", "wandb_run_dir": None, "wandb_run_id": train.run_id,
                              "wandb_group": train.group}
    resumed = start_train_tracking(WandbConfig(mode="disabled"), out, {}, out, is_main=True, run_id="abc")
    assert (resumed.run_id, resumed.group) == ("abc", "exp1-abc"), "a resumed run keeps its group"
    named = start_train_tracking(WandbConfig(mode="disabled", group="ablation-7"), out, {}, out, is_main=True)
    assert named.group == "ablation-7"
    assert start_train_tracking(WandbConfig(mode="offline"), out, {}, out, is_main=False).group is None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_falls_back_to_offline_and_resumes_the_id(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    cfg = WandbConfig(mode="auto", project="t", init_timeout=3)
    t = start_tracking(cfg, str(no_credentials), {"optim": {"lr": 0.1}}, is_main=True)
    try:
        assert t.active and t.mode == "offline"
        t.log({"train/loss": 2.0}, step=1)
    finally:
        t.finish()
    # A resumed job passes the stored id: the same run continues.
    again = start_tracking(WandbConfig(mode="offline", project="t"), str(no_credentials), {}, is_main=True,
                           run_id=t.run_id)
    try:
        assert again.run_id == t.run_id and again.mode == "offline"
        again.log({"train/loss": 1.0}, step=2)
    finally:
        again.finish()
    s = read_offline_run(again.run_dir)
    assert s["run_id"] == t.run_id and s["summary"]["train/loss"] == 1.0
    record = read_offline_run_record(again.run_dir)
    assert record["run_id"] == t.run_id and record["project"] == "t" and "run_group" not in record


# What rank 0 lives through when another rank fails: DeepSpeed's node launcher
# SIGTERMs every rank's process tree (deepspeed/launcher/launch.py,
# terminate_process_tree); rank 0 blocks the signal (pipeline/training/preemption.py),
# gets the collective's error and finishes its run with exit code 1 in the loop's finally.
_RANK_ZERO_UNDER_A_TREE_KILL = textwrap.dedent("""
    import json, os, signal, sys
    import psutil
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    from pipeline.tracking import WandbConfig, start_tracking
    t = start_tracking(WandbConfig(mode="offline", project="t", detached_service=sys.argv[2] == "1"),
                       sys.argv[1], {}, is_main=True)
    t.log({"train/bad_samples": 3.0}, step=1)
    t.log({"train/bad_samples": 0.0, "train/loss": 1.5}, step=2)
    kids = psutil.Process().children(recursive=True)
    names = [k.name() for k in kids]
    for k in kids:
        k.terminate()
    psutil.wait_procs(kids, timeout=10)
    run_dir = t.run_dir
    t.finish(exit_code=1)
    print(json.dumps({"run_dir": run_dir, "descendants": names, "env": os.environ.get("WANDB_SERVICE")}),
          flush=True)
""")


@pytest.mark.parametrize("detached", [True, False], ids=["detached-service", "default-service"])
def test_rank_zero_finishes_its_run_through_the_launchers_tree_kill(no_credentials, detached):
    """With the detached service (the default) the run is written whole, with its exit
    code; with W&B's default child service the same SIGTERM kills the service first
    (wandb-core exits on SIGTERM without writing a buffered offline run), which is
    how CI once lost a failed run's W&B summary."""
    proc = subprocess.run([sys.executable, "-c", _RANK_ZERO_UNDER_A_TREE_KILL, str(no_credentials),
                           "1" if detached else "0"], capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    run = read_offline_run(info["run_dir"])
    if detached:
        assert not any("wandb-core" in name for name in info["descendants"]), info
        assert info["env"] is None, "the detached service's token stayed in the environment for child processes"
        assert run["summary"].get("train/loss") == 1.5 and run["summary"].get("train/bad_samples") == 0.0, run
        assert run.get("exit_code") == 1, {k: run.get(k) for k in ("state", "exit_code")}
    else:
        assert any("wandb-core" in name for name in info["descendants"]), info
        assert run["summary"] == {}, "W&B's child service survived the tree kill: the detached service may be moot"
