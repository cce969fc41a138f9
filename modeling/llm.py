"""The language model: from a local directory (a transformers LM, or an unmodified
LLaVA `llava_llama` folder, see modeling.checkpoints.base), or a LLaMA built from
`LLMConfig` with random weights; LoRA through peft on its linear layers only
(lm_head excluded)."""
from __future__ import annotations

import torch
from torch import nn

from modeling.checkpoints.base import BaseCheckpoint, check_llm_tensors, inspect_base
from modeling.config import ConfigError, LLMConfig, LoRAConfig, ModelConfig
from modeling.vision import torch_dtype


def build_llm(cfg: ModelConfig, vocab_size: int | None, pad_token_id: int | None = None,
              bos_token_id: int | None = None, eos_token_id: int | None = None,
              base: BaseCheckpoint | None = None) -> nn.Module:
    """The causal LM, in `cfg.dtype`, with `cfg.llm.attn_implementation`.

    vocab_size: the tokenizer's length; a random-init LLM gets
    max(llm.vocab_size or 0, vocab_size) rows; a loaded one must already have
    at least that many (a clear error otherwise, instead of index errors later).
    Under an active HfDeepSpeedConfig with ZeRO-3, transformers partitions the
    model at construction (from_pretrained and _from_config both do).
    A loaded one: every tensor of llm.path is accounted for (see
    modeling.checkpoints.base; its projectors are loaded by the model, not here)
    and the llm.* shape fields must match it.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    lc = cfg.llm
    dtype = torch_dtype(cfg.dtype)
    if lc.path:
        base = base if base is not None else inspect_base(lc.path)  # the caller's scan, when it has one
        # A llava_llama folder (by its config.json) gets the LlamaConfig inside its
        # config; transformers does not know the model_type. The weights are still read
        # by from_pretrained, which partitions them under ZeRO-3 as they load.
        config = base.llm_config()
        model, info = AutoModelForCausalLM.from_pretrained(
            lc.path, attn_implementation=lc.attn_implementation, dtype=dtype, output_loading_info=True,
            **({"config": config} if config is not None else {}))
        check_llm_tensors(base, model, info)
        rows = model.get_input_embeddings().num_embeddings
        if vocab_size is not None and vocab_size > rows:
            raise ConfigError(f"llm.path={lc.path} has {rows} embedding rows but the tokenizer "
                              f"has {vocab_size} tokens; use the tokenizer of that model")
        _check_shape_fields(lc, model.config)
        return model
    rows = lc.vocab_size or 0
    if vocab_size is not None:
        if lc.vocab_size is not None and vocab_size > lc.vocab_size:
            raise ConfigError(f"llm.vocab_size={lc.vocab_size} is smaller than the tokenizer "
                              f"({vocab_size} tokens); raise it or set it to null")
        rows = max(rows, vocab_size)
    if rows <= 0:
        raise ConfigError("llm.vocab_size is null and no tokenizer was given to size the embeddings")
    config = LlamaConfig(
        vocab_size=rows, hidden_size=lc.hidden_size, intermediate_size=lc.intermediate_size,
        num_hidden_layers=lc.num_layers, num_attention_heads=lc.num_heads,
        num_key_value_heads=lc.num_kv_heads or lc.num_heads,
        max_position_embeddings=lc.max_position_embeddings, rms_norm_eps=lc.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(lc.rope_theta)},
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        tie_word_embeddings=False)
    return LlamaForCausalLM._from_config(config, attn_implementation=lc.attn_implementation,
                                         dtype=dtype)


def _check_shape_fields(lc: LLMConfig, loaded) -> None:
    """The llm.* fields must describe the loaded model: the merged export writes them
    as the model's config, so a wrong one would only surface when it is read back."""
    rope = getattr(loaded, "rope_parameters", None) or {}
    pairs = (("hidden_size", "hidden_size"), ("intermediate_size", "intermediate_size"),
             ("num_layers", "num_hidden_layers"), ("num_heads", "num_attention_heads"),
             ("max_position_embeddings", "max_position_embeddings"), ("rms_norm_eps", "rms_norm_eps"))
    wrong = [(ours, getattr(lc, ours), getattr(loaded, theirs)) for ours, theirs in pairs
             if getattr(loaded, theirs, None) is not None and getattr(lc, ours) != getattr(loaded, theirs)]
    kv = getattr(loaded, "num_key_value_heads", None)
    if kv is not None and (lc.num_kv_heads or lc.num_heads) != kv:
        wrong.append(("num_kv_heads", lc.num_kv_heads, kv))
    if "rope_theta" in rope and float(lc.rope_theta) != float(rope["rope_theta"]):
        wrong.append(("rope_theta", lc.rope_theta, rope["rope_theta"]))
    if wrong:
        raise ConfigError(f"llm.path={lc.path}: " + "; ".join(
            f"llm.{name}={ours} but the model has {theirs}" for name, ours, theirs in wrong)
            + "; set these llm fields to match the model")


def apply_lora(llm: nn.Module, lora: LoRAConfig) -> nn.Module:
    """Wrap with peft LoRA (base weights frozen, adapters trainable), or, when
    LoRA is disabled, return the LLM with every weight trainable."""
    if not lora.enabled:
        for p in llm.parameters():
            p.requires_grad_(True)
        return llm
    from peft import LoraConfig, get_peft_model

    tm = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    pcfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=tm, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(llm, pcfg)


def causal_lm(llm: nn.Module) -> nn.Module:
    """The transformers model inside a (possibly) peft-wrapped LLM; LoRA layers are
    injected in place, so calling it runs the adapters too."""
    get_base = getattr(llm, "get_base_model", None)
    return get_base() if callable(get_base) else llm


def llm_dtype(llm: nn.Module) -> torch.dtype:
    return causal_lm(llm).get_input_embeddings().weight.dtype
