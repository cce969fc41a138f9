"""transformers' Auto classes for the merged export (config.json model_type "fakereasoning").

`import modeling` registers, once per process:
    AutoConfig: "fakereasoning" -> FakeReasoningConfig
    AutoModel:  FakeReasoningConfig -> FakeReasoningAutoModel
so that, without trust_remote_code (the code is this installed package, not the folder),

    import modeling
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    config = AutoConfig.from_pretrained("export/merged")
    model = AutoModel.from_pretrained("export/merged")        # the FakeReasoningModel, eval mode
    tokenizer = AutoTokenizer.from_pretrained("export/merged")  # (*)

(*) exact for the project's byte-level BPE; a folder with a SentencePiece
tokenizer.model needs modeling.tokenization.loading.load_tokenizer under transformers 5
(that module says why). `model.tokenizer` is always the exact one.

`AutoModel.from_pretrained` hands the folder to `modeling.checkpoints.checkpoint.load_pretrained`
and returns the same `FakeReasoningModel` it does (with `model.tokenizer`), so
every loader gives the same weights, CPM ids and outputs. The model is a torch
module built from components (two vision towers, a fusion block, a peft-capable
LLM), not a `PreTrainedModel`: transformers' own weight loading would have to
re-implement the export's key layout and tokenizer-dependent construction, so
FakeReasoningAutoModel is a loader class that AutoModel can dispatch to.

Only a local folder loads (nothing is downloaded). `dtype` / `torch_dtype` and
`attn_implementation` map onto the ModelConfig (`dtype`, `llm.attn_implementation`);
`config_overrides` takes any partial ModelConfig dict. Other loading options of
transformers (device_map, quantization_config, ...) are refused by name rather
than ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModel, PretrainedConfig

from modeling.checkpoints.formats import MERGED_MODEL_TYPE

MODEL_TYPE = MERGED_MODEL_TYPE

# Keyword arguments AutoModel.from_pretrained passes or accepts for the hub and
# for remote code: they do not change what a local folder holds, so any value is fine.
_HUB_KWARGS = frozenset({"cache_dir", "force_download", "local_files_only", "proxies", "resume_download",
                         "revision", "token", "use_auth_token", "subfolder", "_from_auto", "_commit_hash",
                         "trust_remote_code", "code_revision", "adapter_kwargs", "_from_pipeline"})


class FakeReasoningConfig(PretrainedConfig):
    """config.json of a merged export, as transformers reads it.

    model: the ModelConfig dict of the export (modeling.config.ModelConfig.to_dict()).
    format_version: the merged format's version (modeling.checkpoints.checkpoint.FORMAT_VERSION).
    """

    model_type = MODEL_TYPE

    # An explicit __init__ (not dataclass fields) so that transformers 4, whose
    # configs are plain classes, and 5, whose configs are dataclasses that pass
    # a subclass's keyword arguments through, both build it the same way.
    def __init__(self, model: dict | None = None, format_version: int | None = None, **kwargs):
        self.model = dict(model or {})
        self.format_version = format_version
        super().__init__(**kwargs)

    def model_config(self):
        """The export's ModelConfig."""
        from modeling.config import ModelConfig

        return ModelConfig.from_dict(self.model)


def _overrides(config: FakeReasoningConfig | None, kwargs: dict[str, Any]) -> dict | None:
    """The ModelConfig overrides that AutoModel.from_pretrained's arguments ask for."""
    import torch

    out: dict[str, Any] = dict(config.model) if isinstance(config, FakeReasoningConfig) else {}
    dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)  # 5's name, 4's name
    dtype = dtype if dtype is not None else torch_dtype
    if dtype is not None and dtype != "auto":
        out["dtype"] = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
    attn = kwargs.pop("attn_implementation", None)
    if attn is not None:
        out.setdefault("llm", {})
        out["llm"] = {**out["llm"], "attn_implementation": attn}
    out.update(kwargs.pop("config_overrides", None) or {})
    unsupported = sorted(k for k, v in kwargs.items() if k not in _HUB_KWARGS and v is not None)
    if unsupported:
        raise ValueError(f"FakeReasoningAutoModel.from_pretrained does not support {unsupported}; pass "
                         f"dtype, attn_implementation or config_overrides (a partial ModelConfig dict)")
    return out or None


class FakeReasoningAutoModel:
    """What AutoModel dispatches a FakeReasoningConfig to (see the module docstring)."""

    config_class = FakeReasoningConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """The FakeReasoningModel of a merged export folder, in eval mode, with its tokenizer
        as `model.tokenizer` (modeling.checkpoints.checkpoint.load_pretrained)."""
        from modeling.checkpoints.checkpoint import CheckpointError, load_pretrained

        if model_args:
            raise ValueError(f"FakeReasoningAutoModel.from_pretrained takes no positional model arguments, "
                             f"got {len(model_args)}")
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: not a local folder; a FakeReasoning export loads from disk only")
        model, _ = load_pretrained(folder, _overrides(config, dict(kwargs)))
        return model

    @classmethod
    def _from_config(cls, config: FakeReasoningConfig, tokenizer=None, **kwargs):
        """A freshly initialised FakeReasoningModel of `config` (AutoModel.from_config).

        tokenizer: needed for the CPM and generation (FakeReasoningModel's own rule)."""
        from modeling.config import ModelConfig
        from modeling.model import FakeReasoningModel

        overrides = _overrides(config, dict(kwargs))
        return FakeReasoningModel(ModelConfig.from_dict(overrides or {}), tokenizer)


def register() -> None:
    """Register the config and model with transformers' Auto classes (idempotent)."""
    AutoConfig.register(MODEL_TYPE, FakeReasoningConfig, exist_ok=True)
    AutoModel.register(FakeReasoningConfig, FakeReasoningAutoModel, exist_ok=True)
