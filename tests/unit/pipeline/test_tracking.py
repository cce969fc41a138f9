"""W&B tracking never stops training: mode resolution, rank 0 only, fallbacks."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

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


# What a rank that the DeepSpeed launcher kills does: start an offline run, log
# two steps, then the launcher's terminate_process_tree (SIGTERM to every
# descendant, then to the rank) ends the rank before it calls finish().
_KILLED_RANK = textwrap.dedent("""
    import json, os, signal, sys, time
    import psutil
    from pipeline.tracking import WandbConfig, start_tracking
    t = start_tracking(WandbConfig(mode="offline", project="t", detached_service=sys.argv[2] == "1"),
                       sys.argv[1], {}, is_main=True)
    t.log({"train/bad_samples": 3.0}, step=1)
    t.log({"train/bad_samples": 0.0, "train/loss": 1.5}, step=2)
    time.sleep(2)  # records still in this process's send buffer die with it; this test is about the service
    kids = psutil.Process().children(recursive=True)
    print(json.dumps({"run_dir": t.run_dir, "descendants": [k.name() for k in kids]}), flush=True)
    for k in kids:
        k.terminate()
    time.sleep(0.5)  # the launcher's SIGKILL comes later; the detached service must not need it
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_killed_rank_keeps_its_offline_run(no_credentials):
    """The run outlives a process-tree kill before finish(): the detached W&B service
    is not among the rank's descendants, so it writes what it received."""
    proc = subprocess.run([sys.executable, "-c", _KILLED_RANK, str(no_credentials), "1"], capture_output=True,
                          text=True, timeout=120, cwd=os.getcwd())
    assert proc.returncode == -9, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not any("wandb-core" in name for name in info["descendants"]), info
    deadline = time.monotonic() + 60  # the service writes the run once idle (tracking.SERVICE_IDLE_TIMEOUT)
    while True:
        try:
            summary = read_offline_run(info["run_dir"])["summary"]
        except RuntimeError:  # read while the service writes it
            if time.monotonic() > deadline:
                raise
            summary = {}
        if summary or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert summary.get("train/loss") == 1.5 and summary.get("train/bad_samples") == 0.0, (summary, proc.stderr[-2000:])
