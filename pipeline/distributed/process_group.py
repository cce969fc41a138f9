"""Process-group start-up (DeepSpeed picks NCCL on GPUs and gloo on CPUs
without oneCCL) with the configured collective timeout, the line that places
each rank in the job (node, host, pid), and the few collectives the pipeline
uses; each is a no-op in a world of one."""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Mapping

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """Start the process group from the launcher's environment (RANK, WORLD_SIZE,
    MASTER_ADDR...). A plain `python launch/train.py` becomes a world of one.

    `timeout_s` (TrainConfig.distributed_timeout_s) bounds every collective: a
    rank that hangs alive fails the job after that long instead of blocking the
    others for DeepSpeed's default (DEEPSPEED_TIMEOUT minutes, 10 unless set)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    accel = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)
    extra = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), **extra)
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank,
                    accel.communication_backend_name())


def _first_env(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str | None, str | None]:
    for n in names:
        if env.get(n, "") != "":
            return env[n], n
    return None, None


def rank_banner(info: DistInfo, env: Mapping[str, str] | None = None, host: str | None = None,
                pid: int | None = None) -> str:
    """One line that places this rank in the job, for every rank's log:

    rank R/W: node N/NN (CROSS_RANK/CROSS_SIZE), local rank L, host H, pid P,
    rendezvous MASTER_ADDR:MASTER_PORT, backend B

    DeepSpeed's node launcher sets CROSS_RANK/CROSS_SIZE; torchrun (GROUP_RANK)
    and SLURM (SLURM_NODEID/SLURM_NNODES) are read when it did not. The
    parenthesis names the variables the node numbers came from. The pid maps
    a launcher's "exits with return code = -9" / "Killing subprocess PID" line
    to a global rank on nodes with several ranks.
    """
    env = os.environ if env is None else env
    node, node_var = _first_env(env, ("CROSS_RANK", "GROUP_RANK", "NODE_RANK", "SLURM_NODEID"))
    nodes, nodes_var = _first_env(env, ("CROSS_SIZE", "SLURM_NNODES"))
    if nodes is None:
        local, local_var = _first_env(env, ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"))
        if local is not None and local.isdigit() and int(local) > 0 and info.world_size % int(local) == 0:
            nodes, nodes_var = str(info.world_size // int(local)), f"WORLD_SIZE/{local_var}"
    source = f"{node_var or '-'}/{nodes_var or '-'}"
    rendezvous = f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}"
    return (f"rank {info.rank}/{info.world_size}: node {node if node is not None else '?'}/"
            f"{nodes if nodes is not None else '?'} ({source}), local rank {info.local_rank}, "
            f"host {host or socket.gethostname()}, pid {os.getpid() if pid is None else pid}, "
            f"rendezvous {rendezvous}, backend {info.backend}")


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def shutdown(completed: bool = True) -> None:
    """End the process group, if one was started. Left to interpreter exit, gloo's
    threads sometimes abort the process ("terminate called without an active
    exception", status -6) after all the work is done.

    completed: every rank got through the work. Then the ranks first meet in a
    barrier: one that tore its group down while a peer still worked (rank 0
    merging the output) left that peer's gloo threads facing a closed
    connection, and a launch in CI still aborted. After an error a peer may
    never come, so no barrier: this rank leaves, and its peers' next collective
    fails on the closed connection instead of waiting."""
    if torch.distributed.is_initialized():
        if completed and torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on some rank (one all-reduce; every rank gets the same answer)."""
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=device())
    return bool(all_reduce_sum(t).item() > 0)


def all_gather_objects(obj: Any) -> list[Any]:
    if not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not torch.distributed.is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]
