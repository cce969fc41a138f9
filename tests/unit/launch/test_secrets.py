"""A fake W&B key and HF token in the caller's environment reach no file under the
work folder, no log or output, and no command line of any process while the
launch scripts run (launch/multinode_selftest.sh, launch/slurm.example.sh).

The launcher is a stand-in that records what DeepSpeed's runner would put on
the pdsh command line and in its log: its own arguments and the
`.deepspeed_env` it finds (content and mode). Every process's argv is sampled
from /proc while the script runs."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
KEY, TOKEN = "fake-wandb-key-7f3a9c1e0b", "hf_fakeTokenQ8Z1x"


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def _launcher_stub(bin_dir: Path, record: Path, exit_status: int) -> None:
    """A `deepspeed` that records its argv and the cwd's .deepspeed_env (mode, content)."""
    _stub(bin_dir / "deepspeed",
          f'printf "%s\\n" "$@" >> {record}/argv\n'
          f'if [ -f .deepspeed_env ]; then stat -c %a .deepspeed_env >> {record}/env_mode; '
          f'cat .deepspeed_env >> {record}/env_content; fi\n'
          f'echo "launcher stand-in: no cluster here"\nexit {exit_status}\n')


def _run_watching_argv(cmd, env, cwd, timeout=120):
    """Run `cmd`; returns (CompletedProcess-like tuple, every argv seen in /proc meanwhile)."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    seen.add(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace"))
                except OSError:
                    pass
        time.sleep(0.01)
    out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    return proc.returncode, out, err, seen


def _files_holding(root: Path, needles) -> list[str]:
    hits = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if p.is_file() and not p.is_symlink():
                data = p.read_bytes()
                hits += [f"{p}: {s}" for s in needles if s.encode() in data]
    return hits


def _base_env(bin_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_", "HF_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", WANDB_API_KEY=KEY, HF_TOKEN=TOKEN, WANDB_MODE="offline",
               HF_HOME="/tmp/hf-home-x")
    return env


def test_the_multinode_selftest_keeps_secrets_out_of_files_logs_and_argv(tmp_path):
    bin_dir, record, work = tmp_path / "bin", tmp_path / "record", tmp_path / "work"
    for d in (bin_dir, record):
        d.mkdir()
    # The script runs the checkout's .venv python when there is one (make test creates it),
    # else `python3` from PATH (the stub: the test's interpreter); the launcher is the
    # recording stand-in either way (DEEPSPEED_LAUNCHER).
    _stub(bin_dir / "python3", f'exec {sys.executable} "$@"\n')
    _stub(bin_dir / "pdsh", "exit 0\n")
    _launcher_stub(bin_dir, record, exit_status=1)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("127.0.0.2 slots=1\n127.0.0.3 slots=1\n")
    rc, out, err, argvs = _run_watching_argv(
        ["bash", str(REPO / "launch" / "multinode_selftest.sh"), "--hostfile", str(hostfile), "--workdir", str(work),
         "--cpu", "--probe-only"], {**_base_env(bin_dir), "DEEPSPEED_LAUNCHER": str(bin_dir / "deepspeed")}, tmp_path)
    assert rc == 1 and "FAIL (probe)" in out, (out, err)  # the stand-in launcher ran no rank
    assert (record / "argv").is_file(), err  # the launch happened
    assert "WANDB_MODE=offline" in (record / "env_content").read_text()  # other variables still forwarded
    assert (record / "env_mode").read_text().split() == ["600"]
    assert not (work / ".deepspeed_env").exists()  # removed when the script ended
    leaks = _files_holding(work, (KEY, TOKEN)) + _files_holding(record, (KEY, TOKEN))
    leaks += [f"output: {s}" for s in (KEY, TOKEN) if s in out or s in err]
    leaks += [f"argv: {a[:200]}" for a in argvs if KEY in a or TOKEN in a]
    assert not leaks, leaks
    assert "not forwarding HF_TOKEN WANDB_API_KEY" in err  # names, never values


def test_the_slurm_example_keeps_secrets_out_of_files_logs_and_argv(tmp_path):
    bin_dir, record, venv = tmp_path / "bin", tmp_path / "record", tmp_path / ".venv" / "bin"
    for d in (bin_dir, record, venv):
        d.mkdir(parents=True)
    _stub(bin_dir / "scontrol", 'if [ "$1" = show ]; then echo node-001; fi\n')
    _launcher_stub(venv, record, exit_status=0)
    env = _base_env(bin_dir)
    env.update(SLURM_JOB_ID="123", SLURM_JOB_NODELIST="node-001", SLURM_SUBMIT_DIR=str(tmp_path))
    rc, out, err, argvs = _run_watching_argv(
        ["bash", str(REPO / "launch" / "slurm.example.sh"), "data.train_shards=/x"], env, tmp_path)
    assert rc == 0, (out, err)
    assert (record / "env_mode").read_text().split() == ["600"]
    assert "OMP_NUM_THREADS=8" in (record / "env_content").read_text()
    assert not (tmp_path / ".deepspeed_env").exists()
    leaks = _files_holding(tmp_path, (KEY, TOKEN))
    leaks += [f"output: {s}" for s in (KEY, TOKEN) if s in out or s in err]
    leaks += [f"argv: {a[:200]}" for a in argvs if KEY in a or TOKEN in a]
    assert not leaks, leaks
