"""Weights & Biases tracking that can never stop or slow training.

Only global rank 0 creates a run (the others get a no-op tracker). The mode
"auto" goes online only when credentials exist (WANDB_API_KEY or a netrc
entry for the W&B host) and otherwise offline, so a laptop, a CI runner and a
compute node without internet all just work. An online init that fails or
exceeds `wandb.init_timeout` falls back to offline, and an offline init that
fails falls back to disabled with a logged warning; logging errors are caught
and turn the tracker off. A resumed run reuses its run id (resume="allow").

One experiment is one W&B group: the training run (job_type "train") and every
evaluation of its checkpoints (job_type "eval") share `experiment_group(output
folder, training run id)` unless `wandb.group` names another group; the
evaluation finds the training run through the run_info.json that training
writes next to its export (pipeline/evaluation/wandb_log.py).
"""
from __future__ import annotations

import logging
import netrc
import os
import subprocess
import sys
import time
from typing import Any

from dataclasses import dataclass, field
from typing import Literal

@dataclass
class WandbConfig:
    """Weights & Biases tracking (global rank 0 only)."""

    project: str = "fakereasoning"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); None: the account default."""
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto: online when credentials exist and the server answers, else offline."""
    name: str | None = None
    """Run name; None lets W&B choose."""
    dir: str | None = None
    """Folder that receives `wandb/`; None: the output folder."""
    group: str | None = None
    """Run group (e.g. a sweep or an ablation); None: the experiment's own group
    (`experiment_group`), shared by the training run and the evaluations of its checkpoints."""
    tags: list[str] = field(default_factory=list)
    """Run tags."""
    init_timeout: float = 60.0
    """Seconds wandb.init may take before falling back to offline."""
    detached_service: bool = True
    """Run rank 0's W&B service (wandb-core) outside the rank's process tree
    (`wandb beta core start`), so that a launcher which kills the tree when
    another rank fails, or a SIGTERM to the process group, cannot kill the
    service before it has written the run: wandb-core buffers an offline run's
    records and exits on SIGTERM without writing them. False: W&B's default, a
    service started as a child of the rank. Where `wandb beta core start`
    fails (a wandb without it), the default is used, with a warning."""



log = logging.getLogger(__name__)


def experiment_group(output_dir: str, train_run_id: str) -> str:
    """Default group of a training run and of the evaluations of its checkpoints:
    the output folder's name (what a person recognises) and the training run id
    (unique: two runs/demo folders on two machines are two experiments)."""
    return f"{os.path.basename(os.path.abspath(output_dir))}-{train_run_id}"


def new_run_id() -> str:
    from wandb.sdk.lib.runid import generate_id

    return generate_id()


def has_credentials() -> bool:
    """An API key in the environment or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    path = os.environ.get("NETRC", os.path.expanduser("~/.netrc"))
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> str:
    """"auto" -> online with credentials, offline without; WANDB_MODE set by the
    user wins over "auto" (it is W&B's own documented switch)."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if has_credentials() else "offline"


class Tracker:
    """Thin, failure-proof wrapper around one wandb run."""

    def __init__(self, run: Any = None, mode: str = "disabled", run_id: str | None = None,
                 group: str | None = None):
        self.run = run
        self.mode = mode
        self.run_id = run_id
        self.group = group
        """The W&B group the run was started in (None on ranks other than 0)."""
        self.run_dir: str | None = None
        """The run's folder (…/wandb/offline-run-…) holding its .wandb log; kept after finish()."""
        if run is not None:
            try:
                self.run_dir = os.path.dirname(run.dir)
            except Exception:  # noqa: BLE001 - tracking must not fail training
                pass

    @property
    def active(self) -> bool:
        return self.run is not None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as e:  # noqa: BLE001
            log.warning("W&B log failed (%s); tracking disabled for the rest of the run", e)
            self.run = None

    def update_config(self, values: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.config.update(values, allow_val_change=True)
        except Exception as e:  # noqa: BLE001
            log.warning("W&B config update failed: %s", e)

    def summary(self, values: dict) -> None:
        if self.run is None:
            return
        try:
            for k, v in values.items():
                self.run.summary[k] = v
        except Exception as e:  # noqa: BLE001
            log.warning("W&B summary update failed: %s", e)

    def record(self) -> dict[str, Any]:
        """What run_info.json keeps of the run, so that an evaluation of this run's
        checkpoints can join its group (pipeline/evaluation/wandb_log.py reads it)."""
        return {"wandb_mode": self.mode, "wandb_run_dir": self.run_dir, "wandb_run_id": self.run_id,
                "wandb_group": self.group}

    def use_artifact(self, artifact: Any) -> bool:
        """Declare `artifact` (a wandb.Artifact) an input of the run; False when the
        mode does not allow it: wandb refuses use_artifact in offline mode ("Cannot
        use artifact when in offline mode", wandb/sdk/wandb_run.py), so an offline
        run keeps only what its config records."""
        if self.run is None or self.mode == "offline":
            return False
        try:
            self.run.use_artifact(artifact)
            return True
        except Exception as e:  # noqa: BLE001
            log.warning("W&B use_artifact failed: %s", e)
            return False

    def mark_preempting(self) -> None:
        """Tell W&B the run is being preempted (it shows as preempted, not crashed, and is resumed later)."""
        if self.run is None:
            return
        try:
            self.run.mark_preempting()
        except Exception as e:  # noqa: BLE001
            log.warning("W&B mark_preempting failed: %s", e)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as e:  # noqa: BLE001
            log.warning("W&B finish failed: %s", e)
        self.run = None


DEFAULT_UPLOADS = "metrics, the run's config and system statistics"


def upload_notice(cfg: WandbConfig, uploads: str) -> str:
    """The line printed when a run goes online: where to and what (mode "auto" goes
    online whenever credentials exist, which a user may not have in mind)."""
    entity = cfg.entity or "your default W&B entity"
    return (f"W&B online: uploading to {entity}, project {cfg.project!r}: {uploads} "
            f"(wandb.mode=offline or disabled keeps everything local)")


def start_tracking(cfg: WandbConfig, root_dir: str, config: dict, *, is_main: bool,
                   run_id: str | None = None, job_type: str | None = None,
                   group: str | None = None, uploads: str = DEFAULT_UPLOADS) -> Tracker:
    """A Tracker for this rank: a real run on global rank 0, a no-op elsewhere.

    `run_id`: the id stored in a checkpoint when resuming (the same run
    continues); None starts a new id, which the caller stores in checkpoints.
    `job_type`: the stage ("train", "eval"), set by the caller, not the user.
    `group`: the stage's default group; `cfg.group`, when set, wins.
    `uploads`: what the stage sends, for the one line printed when the run goes online.
    """
    if not is_main:
        return Tracker(run_id=run_id)
    run_id = run_id or new_run_id()
    group = cfg.group or group
    mode = resolve_mode(cfg.mode)
    if mode == "disabled":
        return Tracker(mode="disabled", run_id=run_id, group=group)
    os.makedirs(root_dir, exist_ok=True)
    if mode == "online":
        print(upload_notice(cfg, uploads), file=sys.stderr, flush=True)
    attempts = [mode] + (["offline"] if mode == "online" else [])
    for attempt in attempts:
        run = _try_init(cfg, root_dir, config, attempt, run_id, job_type, group)
        if run is not None:
            return Tracker(run, attempt, run_id, group)
    log.warning("W&B could not start in %s mode; training continues without tracking",
                " or ".join(attempts))
    return Tracker(mode="disabled", run_id=run_id, group=group)


def start_train_tracking(cfg: WandbConfig, root_dir: str, config: dict, output_dir: str, *, is_main: bool,
                         run_id: str | None = None) -> Tracker:
    """The training run's tracker: job_type "train" in the group
    experiment_group(output_dir, run id). Rank 0 draws a new run's id first so that
    the group can name it; a resumed run passes its stored id and keeps its group."""
    if is_main:
        run_id = run_id or new_run_id()
    return start_tracking(cfg, root_dir, config, is_main=is_main, run_id=run_id, job_type="train",
                          group=experiment_group(output_dir, run_id) if run_id else None)


SERVICE_ENV = "WANDB_SERVICE"
"""W&B's documented variable naming the service a process connects to (wandb/env.py)."""
SERVICE_IDLE_TIMEOUT = "10s"
"""How long a detached service lives once no process is connected (Go duration);
nothing needs it longer, so it is short."""


def start_detached_service() -> str | None:
    """Start a wandb-core service that is not a descendant of this process and
    return its token (the value of WANDB_SERVICE), or None when it cannot start.

    `wandb beta core start` runs in a short-lived child that exits once the
    service is up, so the service is re-parented away from this rank: the
    DeepSpeed launcher's process-tree kill (deepspeed/launcher/launch.py
    terminate_process_tree) and a signal to the process group no longer reach
    it, and rank 0, which blocks SIGTERM, finishes its run through it. It stays
    up while a process is connected and exits SERVICE_IDLE_TIMEOUT after the
    last one leaves. (A run whose process is killed before finish() is not
    reliably written: wandb-core 0.31 sometimes shuts down at the idle timeout
    without flushing it.)
    """
    cmd = [sys.executable, "-m", "wandb", "beta", "core", "start", "--idle-timeout", SERVICE_IDLE_TIMEOUT]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        lines = proc.stdout.split()
        token = lines[0] if proc.returncode == 0 and lines else None
        why = f"exit status {proc.returncode}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        token, why = None, str(e)
    if token is None:
        log.warning("W&B: could not start a detached W&B service (%s); using a service inside this rank's "
                    "process tree, which a launcher that kills the tree stops before it writes the run", why)
    return token


def stop_detached_service(token: str) -> None:
    """Ask the detached service `token` to shut down (`wandb beta core stop`)."""
    try:
        subprocess.run([sys.executable, "-m", "wandb", "beta", "core", "stop"], capture_output=True, timeout=60,
                       stdin=subprocess.DEVNULL, env={**os.environ, SERVICE_ENV: token})
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("W&B: stopping the detached service failed: %s", e)


def _try_init(cfg: WandbConfig, root_dir: str, config: dict, mode: str, run_id: str, job_type: str | None,
              group: str | None):
    import wandb

    t0 = time.monotonic()
    # A service the user named (WANDB_SERVICE) or one this process already uses wins.
    token = start_detached_service() if cfg.detached_service and not os.environ.get(SERVICE_ENV) else None
    if token:
        # How wandb.init finds a running service. Only for the init, which connects this
        # process once; left set, it would send child processes (and later runs of this
        # process, after a teardown) to a service that exits when it falls idle.
        os.environ[SERVICE_ENV] = token
    try:
        settings = wandb.Settings(init_timeout=cfg.init_timeout, silent=True,
                                  x_disable_stats=False, console="off")
        return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, group=group, job_type=job_type,
                          tags=list(cfg.tags) or None, dir=root_dir, config=config, id=run_id,
                          resume="allow", mode=mode, settings=settings)
    except Exception as e:  # noqa: BLE001 - any W&B failure must leave training running
        log.warning("W&B init in %s mode failed after %.1fs: %s", mode, time.monotonic() - t0, e)
        # The W&B service still holds the run id of the failed attempt ("run ID is in
        # use"); shutting it down lets the fallback start the same id afresh.
        try:
            wandb.teardown()
        except Exception:  # noqa: BLE001
            pass
        if token:  # a detached service outlives teardown: end it; the next attempt starts its own
            stop_detached_service(token)
        return None
    finally:
        if token:
            os.environ.pop(SERVICE_ENV, None)
