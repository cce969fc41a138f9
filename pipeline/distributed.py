"""Every DeepSpeed specific of the project, in one module.

- the DeepSpeed JSON generated from the TrainConfig (or the user's own, with
  its "auto" values filled and its batch/clipping/precision checked),
- process-group start-up (DeepSpeed picks NCCL on GPUs and gloo on CPUs
  without oneCCL) with the configured collective timeout, and the line that
  places each rank in the job (node, host, pid),
- the model-construction context: `HfDeepSpeedConfig` is alive before any
  weights load, so transformers' `from_pretrained` and `_from_config` run under
  `deepspeed.zero.Init` and partition while loading or random-initialising,
- the engine with parameter groups of their own learning rate,
- gathering of ZeRO-3-partitioned parameters (every rank takes part),
- engine checkpoint save/load, and DeepSpeed's universal checkpoints (the
  `ds_to_universal` layout, the `load_universal` switch).

Nothing else in the project imports deepspeed, so a change of DeepSpeed
version or of its API is a change of this file.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from pipeline.training.config import TrainConfig, TrainConfigError

log = logging.getLogger(__name__)

# transformers keeps only a weak reference to the HfDeepSpeedConfig; this
# module-level strong reference keeps "ZeRO-3 is on" visible to from_pretrained.
_HF_DS_CONFIG: Any = None

# --------------------------------------------------------------------------- config

def build_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON for `cfg` on `world_size` ranks."""
    z = cfg.zero
    o = cfg.optim
    mb = cfg.data.batch_size
    ga = cfg.loop.grad_accum
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": ga,
        "train_batch_size": mb * ga * world_size,
        "gradient_clipping": cfg.loop.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay},
        },
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        # The training loop logs; DeepSpeed's own per-step prints would flood the console.
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"tag_validation": "FAIL"},
    }
    zo: dict[str, Any] = {"stage": z.stage}
    if z.stage >= 1:
        zo.update(overlap_comm=z.overlap_comm, reduce_bucket_size=z.reduce_bucket_size,
                  contiguous_gradients=True)
    if z.stage == 3:
        zo.update(stage3_prefetch_bucket_size=z.stage3_prefetch_bucket_size,
                  stage3_param_persistence_threshold=z.stage3_param_persistence_threshold,
                  # Rank 0 writes the merged model from gathered params, not from this.
                  stage3_gather_16bit_weights_on_model_save=False)
    if z.offload_optimizer == "cpu":
        zo["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if z.offload_param == "cpu":
        zo["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds["zero_optimization"] = zo
    return ds


def resolve_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The generated JSON, or the user's `zero.deepspeed_config` with "auto"
    values filled from `cfg` and conflicting values refused by name."""
    generated = build_deepspeed_config(cfg, world_size)
    if cfg.zero.deepspeed_config is None:
        return generated
    path = cfg.zero.deepspeed_config
    try:
        with open(path, encoding="utf-8") as f:
            user = json.load(f)
    except json.JSONDecodeError as e:
        raise TrainConfigError(f"zero.deepspeed_config: {path} is not valid JSON ({e})") from None
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping"):
        if user.get(key, "auto") == "auto":
            user[key] = generated[key]
        elif user[key] != generated[key]:
            raise TrainConfigError(
                f"zero.deepspeed_config: {path} sets {key}={user[key]} but the training config gives "
                f"{generated[key]} (data.batch_size, loop.grad_accum, loop.grad_clip, world size); "
                "use \"auto\" or make them agree")
    for key in ("bf16", "fp16"):
        section = user.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = generated[key]["enabled"]
        elif bool(section["enabled"]) != generated[key]["enabled"]:
            raise TrainConfigError(f"zero.deepspeed_config: {path} has {key}.enabled={section['enabled']} "
                                   f"but precision={cfg.precision}")
    opt = user.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        for k, v in generated["optimizer"]["params"].items():
            if params.get(k, "auto") == "auto":
                params[k] = v
    user.setdefault("zero_optimization", generated["zero_optimization"])
    user.setdefault("steps_per_print", generated["steps_per_print"])
    user.setdefault("zero_allow_untested_optimizer", True)
    return user


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def write_deepspeed_config(ds_config: dict, directory: str) -> str:
    """Write ds_config.json next to the checkpoints (rank 0 only calls this)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "ds_config.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(ds_config, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- process group

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


# --------------------------------------------------------------------------- model construction

@contextlib.contextmanager
def model_construction(ds_config: dict) -> Iterator[None]:
    """Context for building the model.

    Under ZeRO-3, `HfDeepSpeedConfig` exists before any weights load, so
    transformers' `from_pretrained` and `_from_config` (the LLM and both HF
    towers, pretrained or random-init) run inside `deepspeed.zero.Init` and
    partition each module as its constructor returns, then initialise or load
    the weights through gathered parameters. No rank ever holds the whole LLM.

    The model is deliberately not wrapped in one more, outer `zero.Init`:
    code that initialises weights after a submodule's constructor has
    returned would then write into empty partitions and silently do nothing
    (peft zero-initialises lora_B that way: the adapters would start random).
    What transformers does not build (projectors, fusion, LoRA adapters, a
    timm DINO) is small and is partitioned by `deepspeed.initialize`.
    """
    global _HF_DS_CONFIG
    if zero_stage(ds_config) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    # "auto" values cannot reach HfDeepSpeedConfig: resolve_deepspeed_config filled them.
    _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config)
    yield


@contextlib.contextmanager
def plain_construction() -> Iterator[None]:
    """Build an ordinary, unpartitioned model on one rank (the final export):
    transformers must not see ZeRO-3 as enabled there, or its loaders would
    start collectives that the other ranks never join."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if _HF_DS_CONFIG is not None:
            set_hf_deepspeed_config(_HF_DS_CONFIG)


def param_groups(model: torch.nn.Module, lr: float, projector_lr: float, weight_decay: float,
                 projector_markers: Iterable[str] = ("projector", "fusion")) -> list[dict]:
    """Trainable parameters in up to four groups: (projector or not) x (decay or not).

    Projectors and the fusion module get `projector_lr`. Biases, norms and other
    1-D parameters get no weight decay (they are scales and offsets, not weights).
    Under ZeRO-3 `ds_shape` gives a parameter's real shape (its data is empty).
    """
    markers = tuple(projector_markers)
    groups: dict[tuple[bool, bool], list] = {}
    names: dict[tuple[bool, bool], list[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)
        is_proj = any(m in name for m in markers)
        decay = len(shape) >= 2 and weight_decay > 0
        groups.setdefault((is_proj, decay), []).append(p)
        names.setdefault((is_proj, decay), []).append(name)
    out = []
    for (is_proj, decay), params in sorted(groups.items()):
        out.append({"params": params, "lr": projector_lr if is_proj else lr,
                    "weight_decay": weight_decay if decay else 0.0,
                    "name": f"{'projector' if is_proj else 'main'}{'' if decay else '_no_decay'}"})
    if not out:
        raise ValueError("the model has no trainable parameter")
    return out


def initialize_engine(model: torch.nn.Module, ds_config: dict, groups: list[dict],
                      lr_lambda: Callable[[int], float]):
    """deepspeed.initialize with our param groups and a LambdaLR over DeepSpeed's
    optimizer (its state is saved in the engine checkpoint)."""
    import deepspeed

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    # DeepSpeed's optimizer constructors reject unknown group keys such as "name".
    clean = [{k: v for k, v in g.items() if k != "name"} for g in groups]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=clean, config=ds_config,
                                           lr_scheduler=scheduler)
    return engine


def current_lrs(engine) -> list[float]:
    return [g["lr"] for g in engine.optimizer.param_groups]


def global_grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


# --------------------------------------------------------------------------- partitioned params

def is_partitioned(p: torch.nn.Parameter) -> bool:
    """The parameter is managed by ZeRO-3 (its data is a local partition, or empty, unless gathered)."""
    return hasattr(p, "ds_id")


def full_numel(p: torch.nn.Parameter) -> int:
    """Elements of the whole parameter, also when ZeRO-3 holds only a partition of it."""
    return p.ds_numel if is_partitioned(p) else p.numel()


def partition_numels(module: torch.nn.Module, trainable_only: bool = False) -> tuple[int, int]:
    """(elements this rank stores, elements of the whole model). Under ZeRO-3 a
    rank stores its partition `ds_tensor` of each parameter, plus the whole of
    the "persistent" ones (below stage3_param_persistence_threshold, kept
    gathered between uses); otherwise everything. `trainable_only`: count only
    the parameters that require grad (those with optimizer state)."""
    local = total = 0
    for p in module.parameters():
        if trainable_only and not p.requires_grad:
            continue
        if is_partitioned(p):
            local += p.ds_tensor.numel() + (p.ds_numel if getattr(p, "ds_persist", False) else 0)
            total += p.ds_numel
        else:
            local += p.numel()
            total += p.numel()
    return local, total


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Make ZeRO-3-partitioned `params` whole on every rank for the block.

    Every rank must enter (it is a collective). With `modifier_rank` set,
    changes made on that rank are re-partitioned to all ranks on exit.
    """
    part = [p for p in params if is_partitioned(p)]
    if not part:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(part, modifier_rank=modifier_rank):
        yield


def gather_state_dict(module: torch.nn.Module, rank: int, only_trainable: bool = False,
                      chunk_numel: int = 200_000_000) -> dict[str, torch.Tensor]:
    """A full CPU state dict of `module` on rank 0 ({} elsewhere).

    Parameters are gathered a chunk at a time (every rank takes part), so the
    peak extra memory per rank is one chunk, not the whole model.
    """
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not only_trainable]
    out: dict[str, torch.Tensor] = {}
    i = 0
    while i < len(named):
        chunk, size = [], 0
        while i < len(named) and (not chunk or size < chunk_numel):
            n, p = named[i]
            chunk.append((n, p))
            size += full_numel(p)
            i += 1
        with gathered([p for _, p in chunk]):
            if rank == 0:
                for n, p in chunk:
                    out[n] = p.detach().to("cpu", copy=True)
    if not only_trainable and rank == 0:
        # Buffers are never partitioned; non-persistent ones (rotary tables...) are
        # not part of a state dict.
        for mod_name, mod in module.named_modules():
            for n, b in mod.named_buffers(recurse=False):
                if b is not None and n not in mod._non_persistent_buffers_set:
                    out[f"{mod_name}.{n}" if mod_name else n] = b.detach().to("cpu", copy=True)
    return out


# --------------------------------------------------------------------------- engine checkpoints

def save_engine_checkpoint(engine, directory: str, tag: str, client_state: dict) -> None:
    """All ranks: model/optimizer/scheduler partitions + client state under directory/tag.
    DeepSpeed also copies its zero_to_fp32.py next to the tags."""
    engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=True)


def is_universal_checkpoint(path: str) -> bool:
    """Whether `path` is a folder written by DeepSpeed's `ds_to_universal`: the
    per-parameter fragments under `zero/` plus the source's `*_model_states.pt`
    (copied last, so their presence also says the conversion ran to the end)."""
    if not os.path.isdir(os.path.join(path, "zero")):
        return False
    return any(n.endswith("_model_states.pt") for n in os.listdir(path))


def enable_universal_load(ds_config: dict) -> dict:
    """Ask DeepSpeed to load a universal checkpoint (one that can be loaded on any
    number of ranks) with the next `engine.load_checkpoint`; it must be set before
    `deepspeed.initialize`, since the engine reads it from its config."""
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return ds_config


def load_engine_checkpoint(engine, directory: str, tag: str) -> dict:
    """All ranks: restore a checkpoint; returns its client state."""
    path, client_state = engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {os.path.join(directory, tag)}")
    return client_state or {}
