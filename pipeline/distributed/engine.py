"""The model-construction context (`HfDeepSpeedConfig` alive before any weights
load, so transformers' loaders partition under `deepspeed.zero.Init`), the
engine with parameter groups of their own learning rate, and engine
checkpoints (including DeepSpeed's universal layout)."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterable, Iterator

import torch

from .ds_config import zero_stage

# transformers keeps only a weak reference to the HfDeepSpeedConfig; this
# module-level strong reference keeps "ZeRO-3 is on" visible to from_pretrained.
_HF_DS_CONFIG: Any = None


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
    use_hashing_checkpoint_engine(engine)
    return engine


class _HashingFile:
    """A write-only file object that hashes (sha256) and counts what passes through it."""

    def __init__(self, fh):
        import hashlib

        self._fh = fh
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._fh.write(data)

    def flush(self) -> None:
        self._fh.flush()


def _hashing_engine_class():
    """DeepSpeed's TorchCheckpointEngine, saving through _HashingFile: each file's sha256
    is computed from the bytes as torch.save writes them, not by reading them back."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class HashingCheckpointEngine(TorchCheckpointEngine):
        def __init__(self, config_params=None):
            super().__init__(config_params)
            self.digests: dict[str, tuple[int, str]] = {}

        def save(self, state_dict, path: str):
            with open(path, "wb") as fh:
                out = _HashingFile(fh)
                torch.save(state_dict, out, _use_new_zipfile_serialization=self.zipfile_serialization)
            self.digests[os.path.abspath(path)] = (out.size, out.sha256.hexdigest())

    return HashingCheckpointEngine


def use_hashing_checkpoint_engine(engine) -> bool:
    """Give the engine the hashing variant of its checkpoint engine (DeepSpeed's
    pluggable `engine.checkpoint_engine`), when it is the plain torch one; False
    otherwise (then the marker's hashes are computed by reading the files back)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        return False
    engine.checkpoint_engine = _hashing_engine_class()(engine._config)
    return True


def current_lrs(engine) -> list[float]:
    return [g["lr"] for g in engine.optimizer.param_groups]


def global_grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def save_engine_checkpoint(engine, directory: str, tag: str, client_state: dict) -> dict[str, list]:
    """All ranks: model/optimizer/scheduler partitions + client state under directory/tag.
    DeepSpeed also copies its zero_to_fp32.py next to the tags. Returns the files this
    rank wrote under directory/tag as {relative path: [bytes, sha256]}, hashed while
    written (use_hashing_checkpoint_engine; {} with another checkpoint engine)."""
    engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=True)
    tag_dir = os.path.abspath(os.path.join(directory, tag))
    digests = getattr(engine.checkpoint_engine, "digests", {})
    mine = {p: v for p, v in digests.items() if p.startswith(tag_dir + os.sep)}
    for p in mine:
        del digests[p]
    return {os.path.relpath(p, tag_dir): list(v) for p, v in mine.items()}


def is_universal_checkpoint(path: str) -> bool:
    """Whether `path` is a folder written by DeepSpeed's `ds_to_universal`: the
    per-parameter fragments under `zero/` plus the source's `*_model_states.pt`
    (copied last, so their presence also says the conversion ran to the end)."""
    if not os.path.isdir(os.path.join(path, "zero")):
        return False
    return any(n.endswith("_model_states.pt") for n in os.listdir(path))


def load_engine_checkpoint(engine, directory: str, tag: str) -> dict:
    """All ranks: restore a checkpoint; returns its client state."""
    path, client_state = engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {os.path.join(directory, tag)}")
    return client_state or {}
