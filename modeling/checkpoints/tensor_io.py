"""Weight files and key bookkeeping shared by modeling.checkpoints.checkpoint and the reference import.

Every tensor file is read either with safetensors or with
`torch.load(..., weights_only=True)`: a checkpoint can never run code. Keys are
handled in a "clean" naming, the state-dict names of a FakeReasoningModel built
without LoRA (`llm.model.layers.0.self_attn.q_proj.weight`), so that files do
not depend on whether peft wraps the LLM: `model_key_map` translates clean
names to the live module names (`llm.base_model.model.<...>.base_layer.weight`).
"""
from __future__ import annotations

import json
import pickle
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from common.atomic_files import plain_file_name, write_atomic
# Adapter name peft gives the single LoRA adapter the model creates.
ADAPTER = "default"
# peft's save_pretrained file names (also the reference's LoRA output).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_LIST_LIMIT = 40


class CheckpointError(ValueError):
    """A checkpoint file or directory cannot be read into the model; the message names it."""


def key_list(keys) -> str:
    """Sorted keys for an error message, cut after a few dozen (with the count)."""
    keys = sorted(keys)
    shown = ", ".join(keys[:_LIST_LIMIT])
    return f"[{shown}{f', ... (+{len(keys) - _LIST_LIMIT} more)' if len(keys) > _LIST_LIMIT else ''}]"


def read_json(path: Path, what: str) -> dict:
    """A JSON file of a checkpoint directory; `what` names the directory kind in the error."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: {path.name} is missing, so this is not a {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def read_tensor_file(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from .bin/.pt/.pth with weights_only=True
    (mmap: memory-map a zip-format .bin instead of reading it, for picking a few tensors)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        with _named_safetensors_errors(path):
            state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
            raise CheckpointError(
                f"{path}: cannot be read with weights_only=True (it holds pickled objects other than "
                f"tensors, which are never unpickled): {exc}"
            ) from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"{path}: not a flat state dict of named tensors")
    return state


@contextmanager
def _named_safetensors_errors(path: Path):
    # safetensors' own messages ("incomplete metadata, file not fully covered")
    # do not say which file; a damaged shard of a 3-file model must be named.
    try:
        yield
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file, damaged or incomplete "
                              f"(a truncated download or copy?): {exc}") from exc


def safetensors_names(path: str | Path) -> list[str]:
    """The tensor names of a .safetensors file, from its header only (the tensors are
    not read); safetensors checks there that the file covers every tensor, so a
    truncated file fails here, named."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with _named_safetensors_errors(path), safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def weight_files(directory: str | Path, stems: tuple[str, ...] = ("model", "pytorch_model")) -> list[Path]:
    """The weight files of a model directory: a sharded index, or a single file.

    Looks for `<stem>.safetensors.index.json`, `<stem>.safetensors`,
    `<stem>.bin.index.json`, `<stem>.bin` for each stem, in that order.
    """
    d = Path(directory)
    for stem in stems:
        for ext in (".safetensors", ".bin"):
            index = d / f"{stem}{ext}.index.json"
            if index.is_file():
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                try:
                    return [d / plain_file_name(n, f"{index} weight_map") for n in names]
                except ValueError as exc:
                    raise CheckpointError(str(exc)) from None
            single = d / f"{stem}{ext}"
            if single.is_file():
                return [single]
    tried = [f"{s}{e}" for s in stems for e in (".safetensors(.index.json)", ".bin(.index.json)")]
    raise CheckpointError(f"{d}: no weight file found (looked for {', '.join(tried)})")


def read_weights(directory: str | Path, stems: tuple[str, ...] = ("model", "pytorch_model")) -> dict[str, torch.Tensor]:
    """All tensors of a model directory (every shard), as one dict."""
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(directory, stems):
        part = read_tensor_file(f)
        dup = state.keys() & part.keys()
        if dup:
            raise CheckpointError(f"{f}: keys also present in another shard: {key_list(dup)}")
        state.update(part)
    return state


def write_weights(state: dict[str, torch.Tensor], directory: str | Path, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards plus
    `model.safetensors.index.json` (the transformers layout) above max_shard_bytes."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing storage (tied weights): store a copy.
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[k] = t
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(d / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(d / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_atomic(d / "model.safetensors.index.json", json.dumps(index, indent=2, sort_keys=True))
    return names


def is_lora_key(name: str) -> bool:
    return ".lora_" in name


def clean_key(name: str) -> str:
    """Live module name -> clean name (peft wrapper and `.base_layer` removed)."""
    if name.startswith("llm.base_model.model."):
        name = "llm." + name[len("llm.base_model.model."):]
    return name.replace(".base_layer.", ".")


def model_key_map(model: nn.Module) -> dict[str, str]:
    """clean name -> live state-dict name, for every non-LoRA entry of the model's state dict."""
    return {clean_key(k): k for k in model.state_dict() if not is_lora_key(k)}


def check_keys(source: str, got, expected) -> None:
    """Error listing the missing and the unknown keys, if any."""
    missing, unknown = set(expected) - set(got), set(got) - set(expected)
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing keys {key_list(missing)}")
        if unknown:
            parts.append(f"unknown keys {key_list(unknown)}")
        raise CheckpointError(f"{source}: does not match the model: " + "; ".join(parts))


def load_clean_state(model: nn.Module, state: dict[str, torch.Tensor], expected, source: str) -> None:
    """Copy `state` (clean names) into the model after checking its keys equal `expected`."""
    check_keys(source, state.keys(), expected)
    kmap = model_key_map(model)
    unmapped = set(state) - set(kmap)
    if unmapped:
        raise CheckpointError(f"{source}: keys the model does not have: {key_list(unmapped)}")
    live = {kmap[k]: v for k, v in state.items()}
    try:
        _, unexpected = model.load_state_dict(live, strict=False)
    except RuntimeError as exc:  # shape mismatches, named by torch
        raise CheckpointError(f"{source}: {exc}") from exc
    if unexpected:
        raise CheckpointError(f"{source}: unexpected keys {key_list(unexpected)}")


def ensure_materialised(model: nn.Module, names) -> None:
    """Refuse parameters without elements: they would be saved as empty tensors.

    A parameter that ZeRO-3 partitioned and has not gathered is one (DeepSpeed
    empties its data on every rank). Checked by what the tensor holds, not by
    DeepSpeed's own attributes, which only pipeline/distributed/ reads.
    """
    params = dict(model.named_parameters())
    bad = [n for n in names if n in params and params[n].numel() == 0]
    if bad:
        raise CheckpointError(
            f"parameters hold no elements (partitioned by ZeRO-3?): {key_list(bad)}; gather them first "
            f"(deepspeed.zero.GatheredParameters) and save on one rank"
        )


def lora_layers(model: nn.Module):
    """(live module name, peft LoraLayer) pairs; checks they are plain single-adapter LoRA."""
    from peft.tuners.lora import LoraLayer

    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        adapters = list(mod.lora_A.keys())
        if adapters != [ADAPTER]:
            raise CheckpointError(f"{name}: expected the single LoRA adapter {ADAPTER!r}, found {adapters}")
        if getattr(mod, "lora_variant", {}).get(ADAPTER) is not None or mod.lora_bias.get(ADAPTER):
            raise CheckpointError(f"{name}: only plain LoRA (no DoRA or LoRA bias) can be merged")
        if mod.merged:
            raise CheckpointError(f"{name}: the adapter is already merged into the base weight")
        yield name, mod


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clean state dict of the whole model with every LoRA delta added to its base weight.

    Computed per layer (W + peft's own delta, in W's dtype, exactly like peft's
    merge) without touching the live model, so export never perturbs training.
    """
    state = {clean_key(k): v.detach() for k, v in model.state_dict().items() if not is_lora_key(k)}
    for name, mod in lora_layers(model):
        weight = mod.get_base_layer().weight.detach()
        state[clean_key(f"{name}.base_layer.weight")] = weight + mod.get_delta_weight(ADAPTER).to(weight.dtype)
    return state


def has_lora(model: nn.Module) -> bool:
    return any(is_lora_key(n) for n, _ in model.named_parameters())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA adapter of model.llm in peft's file naming (empty without LoRA),
    e.g. "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"."""
    if not has_lora(model):
        return {}
    from peft import get_peft_model_state_dict

    live = {n: p.detach() for n, p in model.llm.named_parameters() if is_lora_key(n)}
    return get_peft_model_state_dict(model.llm, state_dict=live, adapter_name=ADAPTER, save_embedding_layers=False)


def load_adapter_file(model: nn.Module, path: Path, adapter_config: dict) -> None:
    """Load a peft adapter file into model.llm after checking its config and keys against the model."""
    from peft import set_peft_model_state_dict

    live = model.llm.peft_config[ADAPTER]
    for field, ours, name in (("r", live.r, "lora.r"), ("lora_alpha", live.lora_alpha, "lora.alpha")):
        if adapter_config.get(field) != ours:
            raise CheckpointError(f"{path.parent / ADAPTER_CONFIG}: {field}={adapter_config.get(field)} but the "
                                  f"model has {name}={ours}")
    state = read_tensor_file(path)
    check_keys(str(path), state.keys(), lora_state_dict(model).keys())
    result = set_peft_model_state_dict(model.llm, state, adapter_name=ADAPTER)
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"{path}: peft did not place keys {key_list(result.unexpected_keys)}")


def reset_lora(model: nn.Module) -> None:
    """Fresh LoRA adapters (A random, B zero: the model's outputs are unchanged)."""
    for _, mod in lora_layers(model):
        mod.reset_lora_parameters(ADAPTER, True)


@contextmanager
def skip_weight_init():
    """Build modules without running their (slow, about to be overwritten) initialisers."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: just initialise
        yield
        return
    with no_init_weights():
        yield
