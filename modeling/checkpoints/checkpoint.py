"""Checkpoints of the FakeReasoning model: trainable state, merged export, loading.

Trainable checkpoint directory (`save_trainable` / `load_trainable`):
    model_config.json                 {"format": "fakereasoning-trainable", "version": 1, "model": ModelConfig dict}
    adapter_config.json               peft LoraConfig (save_pretrained format; absent without LoRA)
    adapter_model.safetensors         peft adapter weights, peft key names
                                      ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    non_lora_trainables.safetensors   every other trainable tensor: projectors, fusion (and the
                                      LLM or towers if they are trained), clean names ("fusion.q_proj.weight")
    base_weights.safetensors          frozen tensors nothing else can restore: those of components
                                      whose path is None (random-init towers/LLM of the tiny preset)
    tokenizer files                   when the model has a tokenizer
The frozen LLM and towers of a component with a path are read back from that path.

Merged directory (`export_merged` / `load_pretrained`): self-contained.
    config.json                       {"model_type": "fakereasoning", "format_version": 1, "model": ModelConfig
                                      dict with lora disabled and all paths null}
    model.safetensors                 (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
                                      every tensor, LoRA merged into the LLM: clip_tower.model.*, dino_tower.model.*,
                                      clip_projector.*, dino_projector.*, fusion.*, llm.model.*, llm.lm_head.weight
    tokenizer files

The reference's released formats are read by `import_reference` (modeling/checkpoints/reference.py).

`checkpoint_format(directory)` is the one place that tells these formats apart
(every loader and the evaluation runner ask it). Both export folders also get a
model card, README.md (modeling/checkpoints/model_card.py).
"""
from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from modeling.checkpoints.tensor_io import (
    ADAPTER,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CheckpointError,
    clean_key,
    ensure_materialised,
    has_lora,
    is_lora_key,
    load_adapter_file,
    load_clean_state,
    lora_state_dict,
    merged_state_dict,
    model_key_map,
    read_json,
    read_tensor_file,
    read_weights,
    reset_lora,
    skip_weight_init,
    write_weights,
)
from modeling.checkpoints.reference import NON_LORA_FILE
from modeling.checkpoints.reference import import_reference  # noqa: F401  (public API lives here)
from modeling.config import ModelConfig
from common.atomic_files import write_atomic
from modeling.checkpoints.formats import FORMAT_VERSION, LLAVA_MODEL_TYPE, MERGED_MODEL_TYPE, TRAINABLE_FORMAT
from modeling.checkpoints.model_card import write_model_card
from modeling.tokenization.export import save_tokenizer
from modeling.tokenization.loading import load_checkpoint_tokenizer

MODEL_CONFIG = "model_config.json"
NON_LORA = "non_lora_trainables.safetensors"
BASE_WEIGHTS = "base_weights.safetensors"

__all__ = [
    "CheckpointError", "save_trainable", "load_trainable", "export_merged", "load_pretrained",
    "load_for_inference", "import_reference", "lora_state_dict", "checkpoint_parameters", "checkpoint_format",
]

CheckpointFormat = Literal["merged", "trainable", "reference"]


# ---------------------------------------------------------------------- pieces of the trainable state
def _trainable_keys(model) -> list[str]:
    """Clean names of the trainable non-LoRA parameters."""
    return sorted(clean_key(n) for n, p in model.named_parameters() if p.requires_grad and not is_lora_key(n))


def _unrestorable_keys(model) -> list[str]:
    """Clean names of frozen tensors whose component has no path to reload them from."""
    cfg = model.config
    from_path = tuple(p for p, path in (("clip_tower.", cfg.clip.path), ("dino_tower.", cfg.dino.path),
                                        ("llm.", cfg.llm.path)) if path)
    trainable = set(_trainable_keys(model))
    return sorted(k for k in model_key_map(model) if k not in trainable and not k.startswith(from_path))


def checkpoint_parameters(model) -> list:
    """The parameters `save_trainable` reads (trainable ones and frozen ones of path-less components).

    For ZeRO-3: gather exactly these around save_trainable (modifier_rank=None,
    write on rank 0) and around load_trainable (modifier_rank=0, load on rank 0).
    """
    wanted = set(_trainable_keys(model)) | set(_unrestorable_keys(model))
    return [p for n, p in model.named_parameters() if is_lora_key(n) or clean_key(n) in wanted]


def _clean_tensors(model, keys) -> dict[str, torch.Tensor]:
    kmap, state = model_key_map(model), model.state_dict()
    return {k: state[kmap[k]].detach() for k in keys}


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------- trainable checkpoints
def save_trainable(model, out_dir: str | Path, training: Mapping | str | None = None) -> Path:
    """Write the trainable state of `model` (layout in the module docstring) and return the directory.

    training: what the model card records about the run (modeling.checkpoints.model_card.write_model_card).
    Under ZeRO-3, call it inside GatheredParameters(checkpoint_parameters(model)), on one rank.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = {id(p) for p in checkpoint_parameters(model)}
    ensure_materialised(model, [n for n, p in model.named_parameters() if id(p) in ids])
    lora = lora_state_dict(model)
    if lora:
        save_file({k: v.contiguous() for k, v in lora.items()}, str(out / ADAPTER_WEIGHTS[0]), metadata={"format": "pt"})
        model.llm.peft_config[ADAPTER].save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in _clean_tensors(model, _trainable_keys(model)).items()},
              str(out / NON_LORA), metadata={"format": "pt"})
    base = _clean_tensors(model, _unrestorable_keys(model))
    if base:
        save_file({k: v.contiguous() for k, v in base.items()}, str(out / BASE_WEIGHTS), metadata={"format": "pt"})
    _write_json(out / MODEL_CONFIG, {"format": TRAINABLE_FORMAT, "version": FORMAT_VERSION,
                                      "model": model.config.to_dict()})
    if getattr(model, "tokenizer", None) is not None:
        save_tokenizer(model.tokenizer, out)
    write_model_card(out, "trainable", model.config, training)
    return out


def load_trainable(model, directory: str | Path) -> None:
    """Load a `save_trainable` directory into a model built with the same architecture.

    Every file must match the model exactly: missing or unknown keys are an
    error that lists them; tensors are cast to the model's dtypes.
    """
    d = Path(directory)
    meta = read_json(d / MODEL_CONFIG, "trainable checkpoint")
    if meta.get("format") != TRAINABLE_FORMAT:
        raise CheckpointError(f"{d / MODEL_CONFIG}: format {meta.get('format')!r}, expected {TRAINABLE_FORMAT!r}")
    saved_lora = bool(meta.get("model", {}).get("lora", {}).get("enabled"))
    if saved_lora != has_lora(model):
        raise CheckpointError(f"{d}: saved with lora.enabled={saved_lora} but the model has "
                              f"lora.enabled={has_lora(model)}")
    if saved_lora:
        files = [d / n for n in ADAPTER_WEIGHTS if (d / n).is_file()]
        if not files:
            raise CheckpointError(f"{d}: the model has LoRA adapters but there is no {' or '.join(ADAPTER_WEIGHTS)}")
        load_adapter_file(model, files[0], read_json(d / ADAPTER_CONFIG, "peft adapter"))
    load_clean_state(model, read_tensor_file(d / NON_LORA), _trainable_keys(model), str(d / NON_LORA))
    expected_base = _unrestorable_keys(model)
    if expected_base or (d / BASE_WEIGHTS).is_file():
        load_clean_state(model, read_tensor_file(d / BASE_WEIGHTS), expected_base, str(d / BASE_WEIGHTS))


# ---------------------------------------------------------------------- merged export
def _exported_config(model) -> ModelConfig:
    cfg = copy.deepcopy(model.config)
    cfg.lora.enabled = False
    cfg.clip.path = cfg.dino.path = cfg.llm.path = None
    from modeling.llm import causal_lm

    cfg.llm.vocab_size = causal_lm(model.llm).get_input_embeddings().num_embeddings
    return cfg.validate()


def export_merged(model, tokenizer, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30,
                  training: Mapping | str | None = None) -> Path:
    """Write a self-contained model directory (LoRA merged) that `load_pretrained` and, after
    `import modeling`, transformers' AutoConfig/AutoModel read back.

    training: what the model card records about the run (modeling.checkpoints.model_card.write_model_card).
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise CheckpointError("export_merged needs a tokenizer (the merged directory carries it)")
    ensure_materialised(model, [n for n, _ in model.named_parameters()])
    out = Path(out_dir)
    write_weights(merged_state_dict(model), out, max_shard_bytes)
    cfg = _exported_config(model)
    _write_json(out / "config.json", {"model_type": MERGED_MODEL_TYPE, "format_version": FORMAT_VERSION,
                                      "architectures": ["FakeReasoningModel"], "model": cfg.to_dict()})
    save_tokenizer(tokenizer, out)
    write_model_card(out, "merged", cfg, training)
    return out


def _config_with(data: dict, overrides: dict | None) -> ModelConfig:
    cfg = ModelConfig.from_dict(data)
    return ModelConfig.from_dict(overrides, base=cfg) if overrides else cfg


def load_pretrained(directory: str | Path, config_overrides: dict | None = None):
    """(model, tokenizer) from an `export_merged` directory; the model is in eval mode.

    config_overrides: a partial ModelConfig dict applied on top of the saved
    one (e.g. {"dtype": "bfloat16", "llm": {"attn_implementation": "flash_attention_2"}},
    or {"lora": {"enabled": True}} to fine-tune further: fresh adapters, same outputs).
    """
    from modeling.model import FakeReasoningModel

    d = Path(directory)
    meta = read_json(d / "config.json", "merged FakeReasoning model directory")
    if meta.get("model_type") != MERGED_MODEL_TYPE:
        hint = " (a reference checkpoint: use import_reference)" if meta.get("model_type") == LLAVA_MODEL_TYPE else ""
        raise CheckpointError(f"{d / 'config.json'}: model_type {meta.get('model_type')!r}, expected "
                              f"{MERGED_MODEL_TYPE!r}{hint}")
    cfg = _config_with(meta["model"], config_overrides)
    tokenizer = load_checkpoint_tokenizer(d)
    with skip_weight_init():
        model = FakeReasoningModel(cfg, tokenizer)
    expected = set(model_key_map(model))
    load_clean_state(model, read_weights(d, stems=("model",)), expected, str(d))
    reset_lora(model)
    return model.eval(), tokenizer


def load_for_inference(directory: str | Path, config_overrides: dict | None = None):
    """(model, tokenizer) from a merged directory or a trainable checkpoint (`checkpoint_format`).

    A trainable checkpoint rebuilds the model from its model_config.json: the
    LLM and towers come from their configured paths (override them if the
    files moved), everything else from the checkpoint. The model is in eval mode.
    A reference checkpoint is an error: it needs `import_reference` and a base config.
    """
    from modeling.model import FakeReasoningModel

    d = Path(directory)
    fmt = checkpoint_format(d)
    if fmt == "merged":
        return load_pretrained(d, config_overrides)
    if fmt == "reference":
        raise CheckpointError(f"{d}: a reference checkpoint; load it with import_reference")
    meta = read_json(d / MODEL_CONFIG, "trainable checkpoint")
    cfg = _config_with(meta["model"], config_overrides)
    tokenizer = load_checkpoint_tokenizer(d)
    # Every tensor not read from a path is in the checkpoint, so initialising is wasted work.
    with skip_weight_init():
        model = FakeReasoningModel(cfg, tokenizer)
    load_trainable(model, d)
    return model.eval(), tokenizer


# ---------------------------------------------------------------------- which format a folder holds
def checkpoint_format(directory: str | Path) -> CheckpointFormat:
    """The format of a checkpoint folder, from its marker files; the one place that decides it.

      "trainable"  model_config.json with format "fakereasoning-trainable" (save_trainable)
      "merged"     config.json with model_type "fakereasoning" (export_merged)
      "reference"  the reference's releases (import_reference): config.json with
                   model_type "llava_llama" (format (a)), or non_lora_trainables.bin
                   (format (b), whose config.json may be absent)
    The trainable marker is checked first: it is the only one of our files that says
    its format outright. Anything else is a CheckpointError naming the folder and what it holds.
    """
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint folder does not exist")
    found = []
    if (d / MODEL_CONFIG).is_file():
        fmt = read_json(d / MODEL_CONFIG, "trainable checkpoint").get("format")
        if fmt == TRAINABLE_FORMAT:
            return "trainable"
        found.append(f"{MODEL_CONFIG} with format {fmt!r}")
    if (d / NON_LORA_FILE).is_file():
        return "reference"
    if (d / "config.json").is_file():
        model_type = read_json(d / "config.json", "model directory").get("model_type")
        if model_type == MERGED_MODEL_TYPE:
            return "merged"
        if model_type == LLAVA_MODEL_TYPE:
            return "reference"
        found.append(f"config.json with model_type {model_type!r}")
    names = sorted(p.name for p in d.iterdir())
    found.append(f"files {names[:12]}{' ...' if len(names) > 12 else ''}" if names else "no files")
    raise CheckpointError(
        f"{d}: not a FakeReasoning checkpoint (found {'; '.join(found)}); expected {MODEL_CONFIG} with format "
        f"{TRAINABLE_FORMAT!r}, config.json with model_type {MERGED_MODEL_TYPE!r} or {LLAVA_MODEL_TYPE!r}, "
        f"or {NON_LORA_FILE}")
