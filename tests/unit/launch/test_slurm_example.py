"""launch/slurm.example.sh: --help works outside a SLURM job, and a run outside
one stops with a clear message instead of an unbound-variable error."""
import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "launch" / "slurm.example.sh"


def _run(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def test_help_outside_slurm():
    res = _run("--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Usage: sbatch") and "checkpoint.resume=auto" in res.stdout


def test_outside_a_job_it_says_to_submit_with_sbatch():
    res = _run("data.train_shards=/x")
    assert res.returncode == 2
    assert "SLURM_JOB_ID" in res.stderr and "sbatch" in res.stderr and "unbound" not in res.stderr


def test_sigusr1_touches_stop_and_a_75_exit_requeues(tmp_path):
    """The script's preemption path with stand-ins for SLURM and the launcher:
    a fake `deepspeed` waits for OUT/STOP, writes PREEMPTED and exits 75 (what
    the ranks do); SIGUSR1 to the batch shell must create STOP, and the 75 must
    become `scontrol requeue $SLURM_JOB_ID` and exit 0."""
    import signal
    import time

    bin_dir, venv = tmp_path / "bin", tmp_path / ".venv" / "bin"
    bin_dir.mkdir()
    venv.mkdir(parents=True)
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n"
        f'if [ "$1" = show ]; then echo node-001; else echo "$@" >> {calls}; fi\n')
    out = tmp_path / "runs" / "fakereasoning-13b"
    (venv / "deepspeed").write_text(
        "#!/bin/bash\n"
        f"while [ ! -f {out}/STOP ]; do sleep 0.1; done\n"
        f"echo '{{\"step\": 7}}' > {out}/PREEMPTED\n"
        "exit 75\n")
    for f in (bin_dir / "scontrol", venv / "deepspeed"):
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="123", SLURM_JOB_NODELIST="node-001", SLURM_SUBMIT_DIR=str(tmp_path),
               PATH=f"{bin_dir}:{env['PATH']}")
    proc = subprocess.Popen(["bash", str(SCRIPT), "data.train_shards=/x"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while not out.is_dir() and time.monotonic() < deadline:
        time.sleep(0.05)
    # The trap is set before OUT is made.
    proc.send_signal(signal.SIGUSR1)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, stdout
    assert (out / "STOP").exists() and "requeueing job 123" in stdout, stdout
    assert calls.read_text().split() == ["requeue", "123"]
