"""Every DeepSpeed specific of the project, in this package:

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
version or of its API is a change of this package. The rest of the project
imports it as `from pipeline import distributed as dist`; the modules:
ds_config.py (the JSON), process_group.py (start-up, rank banner,
collectives), engine.py (model construction, engine, engine checkpoints),
zero_params.py (partitioned parameters, gathered state dicts).
"""
from .ds_config import (build_deepspeed_config, enable_universal_load, resolve_deepspeed_config,
                        write_deepspeed_config, zero_stage)
from .engine import (current_lrs, global_grad_norm, initialize_engine, is_universal_checkpoint,
                     load_engine_checkpoint, model_construction, param_groups, plain_construction,
                     save_engine_checkpoint, use_hashing_checkpoint_engine)
from .process_group import (DistInfo, all_gather_objects, all_reduce_sum, any_rank, barrier, broadcast_object, device,
                            init_distributed, rank_banner, shutdown)
from .zero_params import full_numel, gather_state_dict, gathered, is_partitioned, partition_numels

__all__ = [
    "build_deepspeed_config",
    "enable_universal_load",
    "resolve_deepspeed_config",
    "write_deepspeed_config",
    "zero_stage",
    "current_lrs",
    "global_grad_norm",
    "initialize_engine",
    "is_universal_checkpoint",
    "load_engine_checkpoint",
    "model_construction",
    "param_groups",
    "plain_construction",
    "save_engine_checkpoint",
    "use_hashing_checkpoint_engine",
    "DistInfo",
    "all_gather_objects",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "shutdown",
    "broadcast_object",
    "device",
    "init_distributed",
    "rank_banner",
    "full_numel",
    "gather_state_dict",
    "gathered",
    "is_partitioned",
    "partition_numels",
]
