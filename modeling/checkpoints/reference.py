"""Import of the reference implementation's released checkpoints (a LLaVA fork).

Two formats:
(a) a merged LLaVA-style directory: config.json (model_type "llava_llama", the
    LLaMA shape and mm_* fields) and weights (model.safetensors, sharded
    safetensors, or pytorch_model*.bin) with the keys
        model.embed_tokens.weight, model.layers.*, model.norm.weight, lm_head.weight
        model.mm_projector.{0,2}.*                 -> clip_projector.{0,2}.*
        model.dino_mm_projector.{0,2}.*            -> dino_projector.{0,2}.*
        model.crossattention.<ref>.*               -> fusion.<ours>.* (modeling.fusion.REFERENCE_NAMES;
                                                      norm.{0,1}.{a_2,b_2} -> {weight,bias})
(b) the LoRA training output: adapter_config.json, adapter_model.{safetensors,bin}
    (peft keys, "base_model.model.model.layers.*.lora_{A,B}.weight") and
    non_lora_trainables.bin (projectors and fusion, "base_model.model.model.mm_projector.*" ...),
    applied on top of the base model it was trained from (a directory in
    format (a), or a plain LLaMA directory with model.*/lm_head keys).
The adapter is kept as LoRA (the model is built with the adapter's r/alpha/
targets), so training can continue from it; export_merged merges it.

The vision towers come from clip.path / dino.path of the base ModelConfig (the
reference loads them from their own paths). Frozen tower copies in the files
(`model.vision_tower.*`, CLIP, and `model.dino_tower.*`, DINOv2) are ignored by
default, their count logged; `load_towers=True` loads them instead, when after
the reference's wrapper prefix (e.g. `model.vision_tower.vision_tower.`) their
names and shapes are exactly those of our tower (clip_tower.model /
dino_tower.model with the configured backend), and is an error otherwise.
Other prefixes to skip (counted in the log too) go in `ignore_prefixes`.
"""
from __future__ import annotations

import copy
import logging
import re
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

from modeling.checkpoints.base import (
    FUSION_PREFIX,
    PROJECTOR_PREFIXES,
    TOWER_PREFIXES,
    check_llava_fields,
)
from modeling.checkpoints.formats import LLAVA_MODEL_TYPE
from modeling.checkpoints.tensor_io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CheckpointError,
    key_list,
    load_adapter_file,
    model_key_map,
    read_json,
    read_tensor_file,
    read_weights,
    reset_lora,
    skip_weight_init,
)
from modeling.config import ModelConfig
from modeling.tokenization.loading import load_checkpoint_tokenizer
from modeling.fusion import REFERENCE_NAMES

log = logging.getLogger(__name__)

NON_LORA_FILE = "non_lora_trainables.bin"
_PROJECTORS = tuple((ref, ours + ".") for ours, ref in PROJECTOR_PREFIXES.items())
# Reference tower copies -> our tower module (its `.model` is the transformers/timm ViT).
_TOWER_MODULES = {"model.vision_tower.": "clip_tower", "model.dino_tower.": "dino_tower"}
# Buffers that older transformers saved and the current towers recompute.
_RECOMPUTED = re.compile(r"(^|\.)position_ids$")
_FUSION = FUSION_PREFIX
# The reference LayerNorm names its affine parameters a_2 (scale) and b_2 (shift).
_NORM_PARAMS = {"a_2": "weight", "b_2": "bias"}
# Our tower weights come from clip.path / dino.path, never from reference files.
_OUR_TOWERS = ("clip_tower.", "dino_tower.")


def to_clean_key(key: str) -> str | None:
    """Reference key -> our clean key ("?"-prefixed when it has no counterpart)."""
    for ref, ours in _PROJECTORS:
        if key.startswith(ref):
            return ours + key[len(ref):]
    if key.startswith(_FUSION):
        module, _, param = key[len(_FUSION):].rpartition(".")
        if module not in REFERENCE_NAMES:
            return "?" + key
        if module.startswith("norm."):
            param = _NORM_PARAMS.get(param, "?" + param)
        return f"fusion.{REFERENCE_NAMES[module]}.{param}"
    return "llm." + key


def to_reference_key(clean: str) -> str:
    """Our clean key -> the reference's name for it (for error messages)."""
    for ref, ours in _PROJECTORS:
        if clean.startswith(ours):
            return ref + clean[len(ours):]
    if clean.startswith("fusion."):
        module, _, param = clean[len("fusion."):].rpartition(".")
        ref_module = {v: k for k, v in REFERENCE_NAMES.items()}.get(module, module)
        if ref_module.startswith("norm."):
            param = {v: k for k, v in _NORM_PARAMS.items()}.get(param, param)
        return f"{_FUSION}{ref_module}.{param}"
    return clean[len("llm."):] if clean.startswith("llm.") else clean


def reference_config(ref: dict, base: ModelConfig, source: str) -> ModelConfig:
    """Our ModelConfig for a reference config.json: LLM shape and mm_* fields over `base`."""
    cfg = copy.deepcopy(base)
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    absent = [k for k in need if k not in ref]
    if absent:
        raise CheckpointError(f"{source}: config.json lacks {absent}")
    llm = cfg.llm
    llm.path = None
    llm.hidden_size, llm.intermediate_size = ref["hidden_size"], ref["intermediate_size"]
    llm.num_layers, llm.num_heads = ref["num_hidden_layers"], ref["num_attention_heads"]
    llm.num_kv_heads = ref.get("num_key_value_heads") or ref["num_attention_heads"]
    llm.vocab_size = ref["vocab_size"]
    llm.rms_norm_eps = ref.get("rms_norm_eps", llm.rms_norm_eps)
    llm.max_position_embeddings = ref.get("max_position_embeddings", llm.max_position_embeddings)
    llm.rope_theta = ref.get("rope_theta", 10000.0)
    if ref.get("model_type") == LLAVA_MODEL_TYPE:
        check_llava_fields(ref, cfg, source)
        cfg.clip.select_layer = ref.get("mm_vision_select_layer", cfg.clip.select_layer)
        hidden = ref.get("mm_hidden_size", cfg.clip.hidden_size)
        if hidden != cfg.clip.hidden_size:
            raise CheckpointError(f"{source}: mm_hidden_size={hidden} but clip.hidden_size="
                                  f"{cfg.clip.hidden_size} (the CLIP tower comes from clip.path)")
    return cfg.validate()


def _map_state(state: dict, source: str) -> dict:
    """Reference tensors -> clean keys; unmappable keys are an error listing them."""
    out, unknown = {}, []
    for key, tensor in state.items():
        clean = to_clean_key(key)
        if "?" in clean:
            unknown.append(key)
        out[clean] = tensor
    if unknown:
        raise CheckpointError(f"{source}: unknown keys {key_list(unknown)}")
    return out


def _tower_wrapper(names, own) -> tuple[str, set, set]:
    """The leading name segments (the reference's wrapper, maybe "") whose removal
    gives exactly `own`'s names; else the closest try's missing and unknown names."""
    best = None
    wrapper, rest = "", set(names)
    while True:
        missing, unknown = own - rest, rest - own
        if not missing and not unknown:
            return wrapper, set(), set()
        if best is None or len(missing) + len(unknown) < len(best[1]) + len(best[2]):
            best = (wrapper, missing, unknown)
        heads = {n.split(".", 1)[0] for n in rest}
        if len(heads) != 1 or any("." not in n for n in rest):
            return best
        head = heads.pop() + "."
        wrapper, rest = wrapper + head, {n[len(head):] for n in rest}


def _tower_state(model, towers: dict, source: str) -> dict:
    """Reference tower copies -> clean keys of our towers; an error unless they match exactly."""
    out = {}
    for prefix, ours in _TOWER_MODULES.items():
        rest = {k[len(prefix):]: v for k, v in towers.items() if k.startswith(prefix)}
        if not rest:
            continue
        own = getattr(model, ours).model.state_dict()
        wrapper, missing, unknown = _tower_wrapper(rest.keys(), set(own))
        recomputed = {n for n in unknown if _RECOMPUTED.search(n)}
        if missing or unknown - recomputed:
            parts = [f"lacks {key_list(missing)}"] if missing else []
            parts += [f"has unknown {key_list(unknown - recomputed)}"] if unknown - recomputed else []
            raise CheckpointError(f"{source}: load_towers=True but {prefix}{wrapper}* does not match {ours}.model "
                                  f"(model.dino_backend={model.config.dino_backend}): " + "; ".join(parts))
        for name, v in rest.items():
            name = name[len(wrapper):]
            if name in recomputed:
                continue
            if v.shape != own[name].shape:
                raise CheckpointError(f"{source}: {prefix}{wrapper}{name} has shape {tuple(v.shape)} but "
                                      f"{ours}.model.{name} has {tuple(own[name].shape)}")
            out[f"{ours}.model.{name}"] = v
        log.info("%s: %s loaded from %s%s* (%d tensors)", source, ours, prefix, wrapper, len(own))
    return out


def _reference_state(model, state: dict, source: str, load_towers: bool, ignore_prefixes: tuple[str, ...],
                     strip: str = "") -> dict:
    """One reference file's tensors -> clean keys: towers loaded or ignored, `ignore_prefixes`
    skipped (both counted in the log), everything else mapped (unknown keys are an error)."""
    if strip:
        state = {k[len(strip):] if k.startswith(strip) else k: v for k, v in state.items()}
    skip = tuple(ignore_prefixes) if load_towers else (*TOWER_PREFIXES, *ignore_prefixes)
    ignored = Counter(next(p for p in skip if k.startswith(p)) for k in state if k.startswith(skip))
    kept = {k: v for k, v in state.items() if not k.startswith(skip)}
    towers = {k: v for k, v in kept.items() if k.startswith(TOWER_PREFIXES)}
    out = _map_state({k: v for k, v in kept.items() if k not in towers}, source)
    out.update(_tower_state(model, towers, source))
    if ignored:
        log.info("%s: ignored %d tensors (%s)%s", source, sum(ignored.values()),
                 ", ".join(f"{p}*: {ignored[p]}" for p in skip if ignored[p]),
                 "; the towers come from clip.path / dino.path (load_towers=True loads matching copies)"
                 if any(p in TOWER_PREFIXES for p in ignored) else "")
    return out


def _warn_without_towers(state: dict, source: str, load_towers: bool) -> None:
    """load_towers=True on files that hold no tower copy would silently keep the towers of clip.path / dino.path."""
    if load_towers and not any(k.startswith(tuple(f"{t}." for t in _TOWER_MODULES.values())) for k in state):
        log.warning("%s: load_towers=True but the files hold no %s tensors; the towers come from clip.path / "
                    "dino.path", source, " / ".join(f"{p}*" for p in _TOWER_MODULES))


def _load_reference_state(model, state: dict, source: str) -> None:
    """Copy clean-keyed reference tensors into the model (everything but LoRA; the
    towers only when `state` holds them)."""
    kmap = model_key_map(model)
    loaded_towers = tuple(p for p in _OUR_TOWERS if any(k.startswith(p) for k in state))
    expected = {k for k in kmap if not k.startswith(_OUR_TOWERS) or (loaded_towers and k.startswith(loaded_towers))}
    missing = expected - state.keys()
    unknown = state.keys() - expected
    if missing or unknown:
        parts = [f"missing keys {key_list(to_reference_key(k) for k in missing)}"] if missing else []
        parts += [f"unknown keys {key_list(to_reference_key(k) for k in unknown)}"] if unknown else []
        raise CheckpointError(f"{source}: does not match the model: " + "; ".join(parts))
    live_state = model.state_dict()
    live = {}
    for k, v in state.items():
        target = live_state[kmap[k]]
        # The reference may hold the 1x1 convolutions of the bias MLP as Linear weights.
        if v.shape != target.shape and v.numel() == target.numel() and v.squeeze().shape == target.squeeze().shape:
            v = v.reshape(target.shape)
        live[kmap[k]] = v
    try:
        model.load_state_dict(live, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc


def _tokenizer_from(*directories: Path):
    errors = []
    for d in directories:
        try:
            tok = load_checkpoint_tokenizer(d)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        if tok.pad_token is None:
            # LLaVA's Vicuna v1 recipe pads with unk; keep that convention.
            tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
        return tok
    raise CheckpointError("no tokenizer found: " + "; ".join(errors))


def _lora_fields(adapter: dict, source: str) -> dict:
    if adapter.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{source}: peft_type={adapter.get('peft_type')!r}, only LORA is supported")
    for flag in ("use_dora", "use_rslora"):
        if adapter.get(flag):
            raise CheckpointError(f"{source}: {flag}=true is not supported")
    if adapter.get("bias", "none") != "none":
        raise CheckpointError(f"{source}: bias={adapter.get('bias')!r}; only 'none' is supported")
    targets = adapter.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        targets = [targets]
    return {"enabled": True, "r": adapter["r"], "alpha": adapter["lora_alpha"],
            "dropout": adapter.get("lora_dropout", 0.0),
            "target_modules": sorted(targets) if isinstance(targets, list) else targets}


def _init_context(cfg: ModelConfig):
    """Skip random initialisation when every tensor will be loaded: towers from
    their paths, the rest from the reference files (LoRA is reset or loaded)."""
    return skip_weight_init() if cfg.clip.path and cfg.dino.path else nullcontext()


def import_reference(directory: str | Path, base_config: ModelConfig | None = None, *,
                     base_model_dir: str | Path | None = None, tokenizer=None,
                     load_towers: bool = False, ignore_prefixes: tuple[str, ...] = ()):
    """(model, tokenizer) from a reference checkpoint, in eval mode.

    directory: format (a), or format (b) (recognised by non_lora_trainables.bin
        or an adapter file), which also needs `base_model_dir`.
    base_config: what the reference files do not say (tower paths and shapes,
        fusion heads, dtype, LoRA for format (a)); default the paper preset.
        The LLM shape comes from config.json. With LoRA enabled in it, format
        (a) gets fresh adapters (outputs unchanged), ready for fine-tuning.
    tokenizer: default the one stored in the directory (then in base_model_dir);
        a missing pad token becomes unk, as in the reference's Vicuna v1 recipe.
    load_towers: load the files' frozen tower copies (model.vision_tower.*,
        model.dino_tower.*) into clip_tower / dino_tower when they match them
        exactly (an error otherwise); by default they are ignored, counted in the log.
    ignore_prefixes: further reference key prefixes to skip (counted in the log).
    """
    from modeling.model import FakeReasoningModel

    d = Path(directory)
    base = base_config if base_config is not None else ModelConfig.preset("paper")
    adapter_files = [d / n for n in ADAPTER_WEIGHTS if (d / n).is_file()]
    is_lora = bool(adapter_files) or (d / NON_LORA_FILE).is_file()
    if not is_lora:
        ref = read_json(d / "config.json", "reference model directory")
        if ref.get("model_type") != LLAVA_MODEL_TYPE:
            raise CheckpointError(f"{d / 'config.json'}: model_type {ref.get('model_type')!r}, expected "
                                  f"{LLAVA_MODEL_TYPE!r}")
        cfg = reference_config(ref, base, str(d))
        tok = tokenizer if tokenizer is not None else _tokenizer_from(d)
        with _init_context(cfg):
            model = FakeReasoningModel(cfg, tok)
        state = _reference_state(model, read_weights(d), str(d), load_towers, ignore_prefixes)
        _warn_without_towers(state, str(d), load_towers)
        _load_reference_state(model, state, str(d))
        reset_lora(model)
        return model.eval(), tok

    if base_model_dir is None:
        raise CheckpointError(f"{d}: a LoRA training output needs base_model_dir (the model it was trained "
                              f"from: a merged LLaVA directory or a LLaMA directory)")
    if not adapter_files or not (d / NON_LORA_FILE).is_file():
        raise CheckpointError(f"{d}: a LoRA training output needs {' or '.join(ADAPTER_WEIGHTS)} and {NON_LORA_FILE}")
    bdir = Path(base_model_dir)
    ref = read_json((d if (d / "config.json").is_file() else bdir) / "config.json", "reference model directory")
    cfg = reference_config(ref, base, str(d))
    adapter_cfg = read_json(d / ADAPTER_CONFIG, "peft adapter directory")
    cfg = ModelConfig.from_dict({"lora": _lora_fields(adapter_cfg, str(d / ADAPTER_CONFIG))}, base=cfg)
    tok = tokenizer if tokenizer is not None else _tokenizer_from(d, bdir)
    with _init_context(cfg):
        model = FakeReasoningModel(cfg, tok)
    state = _reference_state(model, read_weights(bdir), str(bdir), load_towers, ignore_prefixes)
    extra = _reference_state(model, read_tensor_file(d / NON_LORA_FILE), str(d / NON_LORA_FILE), load_towers,
                             ignore_prefixes, strip="base_model.model.")
    state.update(extra)
    _warn_without_towers(state, f"{bdir} + {d / NON_LORA_FILE}", load_towers)
    _load_reference_state(model, state, f"{bdir} + {d / NON_LORA_FILE}")
    load_adapter_file(model, adapter_files[0], adapter_cfg)
    return model.eval(), tok
