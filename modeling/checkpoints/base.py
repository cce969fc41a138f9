"""The base checkpoint at `llm.path`: a transformers LM directory, or an unmodified
LLaVA `llava_llama` folder (llava-v1.5-13b, or MoF_Models, which the paper fine-tunes).

A `llava_llama` folder is recognised by config.json's model_type (metadata,
never the path). Its config.json is a LlamaConfig plus LLaVA's mm_* fields,
and its weight files (pytorch_model-0000i-of-0000n.bin + index, or
safetensors) hold, next to the LLaMA tensors (model.embed_tokens, model.layers.*,
model.norm, lm_head):
    model.mm_projector.{0,2}.*        -> clip_projector.{0,2}.*
    model.dino_mm_projector.{0,2}.*   -> dino_projector.{0,2}.*  (MoF only)
    model.vision_tower.* / model.dino_tower.*  frozen tower copies (some MoF and
        released FakeReasoning folders): ignored, counted in the log; the towers
        come from clip.path / dino.path
The LLM is loaded by transformers' from_pretrained (so that under ZeRO-3 it is
partitioned while it loads) with a LlamaConfig built from that config.json.
from_pretrained drops the tensors its model has no parameter for: with ZeRO-3
it does not even report them, and it only warns about missing ones. So every
tensor name of the folder is accounted for here: LLM ones must match the model
exactly, projector ones are copied into the projectors, tower ones are counted
and skipped, anything else is an error listing it. The fusion module always
starts random (no base checkpoint has one).
"""
from __future__ import annotations

import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from modeling.checkpoints.formats import LLAVA_MODEL_TYPE
from modeling.checkpoints.tensor_io import (CheckpointError, key_list, read_json, read_tensor_file, safetensors_names,
                                            weight_files)
from modeling.config import ModelConfig

log = logging.getLogger(__name__)

# Our projector module -> the prefix of its weights in a LLaVA folder.
PROJECTOR_PREFIXES = {"clip_projector": "model.mm_projector.", "dino_projector": "model.dino_mm_projector."}
# Frozen tower copies stored by LLaVA-style folders (CLIP in LLaVA, DINOv2 in MoF).
TOWER_PREFIXES = ("model.vision_tower.", "model.dino_tower.")
# A trained FakeReasoning checkpoint's fusion module: never a starting point here.
FUSION_PREFIX = "model.crossattention."
# Buffers that old LLaMA checkpoints saved and transformers recomputes (it skips them itself).
_RECOMPUTED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# config.json entries that describe LLaVA's wrapper, not the LlamaConfig.
_WRAPPER_FIELDS = ("model_type", "architectures", "auto_map")


def _bin_tensors(path: Path) -> dict[str, torch.Tensor]:
    # Memory-mapped, so that naming or picking a few tensors of a 10 GB shard reads
    # only those; legacy (non-zip) torch.save files cannot be mapped and are read whole.
    return read_tensor_file(path, mmap=path.is_file() and zipfile.is_zipfile(path))


def _tensor_names(path: Path) -> list[str]:
    """The tensor names of one weight file, without reading the tensors."""
    if path.suffix != ".safetensors":
        return list(_bin_tensors(path))
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (named by the weight index)")
    return safetensors_names(path)  # a damaged file is named


def _read_tensors(path: Path, names) -> dict[str, torch.Tensor]:
    """Only `names` of one weight file."""
    if path.suffix != ".safetensors":
        state = _bin_tensors(path)
        return {k: state[k] for k in names}
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in names}


@dataclass
class BaseCheckpoint:
    """The tensor names (and the file of each) and config.json of an `llm.path` folder."""

    path: Path
    """The folder (llm.path)."""
    config: dict
    """Its config.json, as read."""
    files: dict[str, Path]
    """Every tensor name of the weight files -> the file that holds it."""

    @property
    def model_type(self):
        return self.config.get("model_type")

    @property
    def is_llava(self) -> bool:
        return self.model_type == LLAVA_MODEL_TYPE

    def names_under(self, prefix: str) -> list[str]:
        return sorted(k for k in self.files if k.startswith(prefix))

    def llm_names(self) -> set[str]:
        """Names left for the language model: all but projectors, towers, fusion and recomputed buffers."""
        other = (*PROJECTOR_PREFIXES.values(), *TOWER_PREFIXES, FUSION_PREFIX)
        return {k for k in self.files if not k.startswith(other) and not _RECOMPUTED.search(k)}

    def tower_counts(self) -> dict[str, int]:
        return {p: n for p in TOWER_PREFIXES if (n := len(self.names_under(p)))}

    def read(self, names) -> dict[str, torch.Tensor]:
        """Only these tensors, opening only the files that hold them."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for f, ns in by_file.items():
            out.update(_read_tensors(f, ns))
        return out

    def llm_config(self):
        """The LlamaConfig of a llava_llama folder (its config.json minus LLaVA's wrapper
        fields; the mm_* entries stay as inert attributes); None for a directory
        transformers reads by itself."""
        mt = self.model_type
        if isinstance(mt, str) and mt.startswith("llava") and not self.is_llava:
            # e.g. "llava" (the llava-hf conversion: language_model.* / multi_modal_projector.* keys).
            raise CheckpointError(f"{self.path / 'config.json'}: model_type {mt!r} is not supported as "
                                  f"llm.path; use the original LLaVA folder (model_type {LLAVA_MODEL_TYPE!r}, "
                                  f"e.g. llava-v1.5-13b or MoF_Models) or a LLaMA directory")
        if not self.is_llava:
            return None
        from transformers import LlamaConfig

        fields = {k: v for k, v in self.config.items() if k not in _WRAPPER_FIELDS}
        if fields.get("rope_scaling", "") is None:  # transformers 4.x wrote null; v5 warns it is deprecated
            del fields["rope_scaling"]
        return LlamaConfig.from_dict(fields)


def inspect_base(path: str | Path) -> BaseCheckpoint:
    """config.json and the tensor names of every weight file (file contents are not read)."""
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"llm.path={d}: not a directory")
    config = read_json(d / "config.json", "model directory (llm.path)")
    files: dict[str, Path] = {}
    for f in weight_files(d):
        for name in _tensor_names(f):
            if name in files:
                raise CheckpointError(f"{f}: tensor {name} is also in {files[name]}")
            files[name] = f
    return BaseCheckpoint(d, config, files)


def check_llm_tensors(base: BaseCheckpoint, llm: nn.Module, loading_info: dict) -> None:
    """Every LLM tensor of the folder went into `llm` and every parameter got one; logs the rest.

    loading_info: from_pretrained's (its missing keys are right under ZeRO-3 too;
    its unexpected keys are not reported there, hence the comparison of names).
    """
    source = f"llm.path={base.path}"
    fusion = base.names_under(FUSION_PREFIX)
    if fusion:
        raise CheckpointError(
            f"{source}: holds {len(fusion)} fusion tensors ({FUSION_PREFIX}*), so it is a trained FakeReasoning "
            f"checkpoint, not a base; load it with import_reference (the fusion of a base run starts random)")
    unknown = base.llm_names() - set(llm.state_dict())
    if unknown:
        raise CheckpointError(f"{source}: tensors the {type(llm).__name__} has no place for (they would be "
                              f"dropped): {key_list(unknown)}")
    missing = set(loading_info.get("missing_keys") or ())
    if missing:
        raise CheckpointError(f"{source}: the weight files lack {key_list(missing)} (transformers would "
                              f"initialise them at random)")
    towers = base.tower_counts()
    log.info("llm.path=%s (model_type %s): %d LLM tensors loaded by transformers%s", base.path, base.model_type,
             len(base.llm_names()),
             f"; ignored {sum(towers.values())} frozen vision-tower tensors "
             f"({', '.join(f'{p}*: {n}' for p, n in towers.items())}); the towers come from clip.path/dino.path"
             if towers else "")


def check_llava_fields(ref: dict, cfg: ModelConfig, source: str) -> None:
    """LLaVA config.json fields the projector weights depend on must agree with `cfg`."""
    ptype = ref.get("mm_projector_type", "linear")
    if ptype != cfg.projector_type:
        raise CheckpointError(f"{source}: mm_projector_type={ptype!r} but model.projector_type="
                          f"{cfg.projector_type!r}; only 'mlp2x_gelu' is supported")
    feature = ref.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise CheckpointError(f"{source}: mm_vision_select_feature={feature!r}; only 'patch' is supported")


def init_projectors_from_base(cfg: ModelConfig, projectors: dict[str, nn.Module],
                              base: BaseCheckpoint | None = None) -> None:
    """Copy the projector weights of the folder at `cfg.llm.path` into `projectors`
    (name -> module, keys of PROJECTOR_PREFIXES); those absent keep their random init.

    Called while the model is built, before any DeepSpeed engine partitions the
    (plain nn.Module) projectors. Logs which were loaded and which start random.
    """
    if not cfg.llm.path:
        return
    base = base if base is not None else inspect_base(cfg.llm.path)  # the caller's scan, when it has one
    source = str(base.path / "config.json")
    found = {name: base.names_under(PROJECTOR_PREFIXES[name]) for name in projectors}
    # The mm_* fields describe a llava_llama folder's projectors; elsewhere (a LLaMA
    # folder carrying them) the tensors' names and shapes are all there is to check.
    if any(found.values()) and base.is_llava:
        check_llava_fields(base.config, cfg, source)
        layer = base.config.get("mm_vision_select_layer")
        if layer is not None and layer != cfg.clip.select_layer:
            raise CheckpointError(f"{source}: mm_vision_select_layer={layer} (the CLIP layer its projector was "
                              f"trained on) but clip.select_layer={cfg.clip.select_layer}")
    loaded, fresh = [], []
    for name, module in projectors.items():
        prefix, names = PROJECTOR_PREFIXES[name], found[name]
        if not names:
            fresh.append(name)
            continue
        state = {k[len(prefix):]: v for k, v in base.read(names).items()}
        own = module.state_dict()
        missing, extra = own.keys() - state.keys(), state.keys() - own.keys()
        if missing or extra:
            parts = [f"lacks {key_list(prefix + k for k in missing)}"] if missing else []
            parts += [f"has unknown {key_list(prefix + k for k in extra)}"] if extra else []
            raise CheckpointError(f"llm.path={base.path}: {prefix}* does not match {name} "
                                  f"({cfg.projector_type}): " + "; ".join(parts))
        for k, v in state.items():
            if v.shape != own[k].shape:
                raise CheckpointError(
                    f"{base.files[prefix + k]}: {prefix + k} has shape {tuple(v.shape)} but {name}.{k} has "
                    f"{tuple(own[k].shape)} (tower width -> llm.hidden_size={cfg.llm.hidden_size})")
        with torch.no_grad():
            module.load_state_dict(state)  # copies, in the module's dtype
        loaded.append(f"{name} <- {prefix}* ({len(state)} tensors)")
    # transformers' load report lists the projector tensors as UNEXPECTED (not LLM
    # weights); this line says where they went.
    log.info("llm.path=%s: projectors loaded: %s; starting random: %s", base.path,
             ", ".join(loaded) or "none", ", ".join(fresh + ["fusion"]))
    if base.is_llava and not loaded:
        # A LLaVA folder is chosen for its trained projector; starting without one is worth a warning.
        log.warning("llm.path=%s is a %s folder but holds no %s tensors: both projectors start random",
                    base.path, LLAVA_MODEL_TYPE, " / ".join(f"{p}*" for p in PROJECTOR_PREFIXES.values()))
