"""Start `launch/train.py` through the real `deepspeed` launcher on this machine.

Used by the demo, the integration tests and the training benchmark, so that
all three run training exactly the way a user does (`deepspeed --num_gpus N
launch/train.py --config RECIPE key=value ...`), with the CPU settings in one
place: DeepSpeed's CPU accelerator (gloo when oneCCL is absent), one intra-op
thread per rank so ranks do not fight over cores, and a free master port so
that concurrent jobs on a shared machine do not collide on 29500.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: launch/ is not installed
TRAIN_SCRIPT = os.path.join(REPO, "launch", "train.py")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_executable() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    if not os.path.isfile(exe):
        raise FileNotFoundError(f"no deepspeed launcher next to {sys.executable}; install deepspeed")
    return exe


def cpu_env(threads_per_rank: int = 1, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS=str(threads_per_rank),
        MKL_NUM_THREADS=str(threads_per_rank),
        TOKENIZERS_PARALLELISM="false",
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
    )
    # Our own run id/dir handling decides; stray user settings would split runs.
    for k in ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR"):
        env.pop(k, None)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if extra:
        env.update(extra)
    return env


def deepspeed_command(recipe: str, overrides: list[str], num_ranks: int = 2,
                      master_port: int | None = None) -> list[str]:
    return [deepspeed_executable(), "--num_gpus", str(num_ranks),
            "--master_port", str(master_port or free_port()), TRAIN_SCRIPT, "--config", recipe, *overrides]


def run_training(recipe: str, overrides: list[str], log_path: str, num_ranks: int = 2,
                 timeout: float | None = None, env: dict | None = None, echo: bool = False) -> float:
    """Run one training job to completion; returns its wall time in seconds.

    Output goes to `log_path` (and to the console with echo=True); a non-zero
    exit raises with the log's tail, so a failure is never silent.
    """
    cmd = deepspeed_command(recipe, overrides, num_ranks)
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    t0 = time.monotonic()
    timed_out = threading.Event()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        # Own process group: a timeout ends the launcher and every rank it started.
        proc = subprocess.Popen(cmd, cwd=REPO, env=env or cpu_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)

        def kill() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        try:
            for line in proc.stdout:
                log.write(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            rc = proc.wait()
        finally:
            if timer:
                timer.cancel()
            if proc.poll() is None:
                kill()
    if timed_out.is_set():
        raise TimeoutError(f"deepspeed training did not finish within {timeout:.0f}s; log {log_path}")
    elapsed = time.monotonic() - t0
    if rc != 0:
        with open(log_path, encoding="utf-8") as f:
            tail = f.read()[-6000:]
        raise RuntimeError(f"deepspeed training exited with {rc} after {elapsed:.0f}s; log {log_path}:\n{tail}")
    return elapsed


# DeepSpeed JIT-compiles these C++ ops the first time a CPU job uses them
# (about 2.5 minutes on 2 cores; cached under ~/.cache/torch_extensions or
# $TORCH_EXTENSIONS_DIR afterwards).
CPU_OPS = ("FusedAdamBuilder", "ShareMemCommBuilder")


def build_cpu_ops(timeout: float = 1800.0, echo: bool = False) -> float:
    """Compile (or load from the cache) DeepSpeed's CPU ops in a child process.

    Doing this once, up front, keeps the first-run compilation out of the time
    of the first training job: callers with a per-job timeout (tests, the demo)
    would otherwise have to budget minutes of compilation into every job.
    Returns the seconds it took (about 1 s when cached).
    """
    code = ("from deepspeed.accelerator import get_accelerator\n"
            f"for name in {CPU_OPS!r}:\n"
            "    get_accelerator().create_op_builder(name).load(verbose=False)\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cpu_env(), timeout=timeout,
                          stdout=None if echo else subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building DeepSpeed's CPU ops {CPU_OPS} failed ({proc.returncode}):\n"
                           f"{(proc.stdout or '')[-4000:]}")
    return time.monotonic() - t0
