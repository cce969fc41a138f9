"""Load-time quantization of the LLM for inference (`--quantize 8bit|4bit`).

A 13B LLM in bf16 needs about 26 GB for its weights alone, more than the
24 GB of most desktop GPUs; 8-bit weights halve that and 4-bit (NF4) weights
quarter it. This is the convention LLaVA's `--load-8bit` / `--load-4bit` users
know: bitsandbytes' `Linear8bitLt` (LLM.int8(), outlier threshold 6.0) and
`Linear4bit` (NF4, double quantization off, compute in the model's dtype) in
place of every `nn.Linear` of the LLM's decoder layers. What stays unquantized,
as in transformers' own bitsandbytes integration: the LM head (the CPM reads
its real/fake logits), the embeddings, the norms, and everything outside the
LLM (the CLIP and DINOv2 towers, the projectors, the fusion module), which are
small next to the LLM and whose outputs feed every token.

LoRA adapters are merged into the base weights first (peft's merge_and_unload):
quantizing the base and keeping the adapters in full precision would run two
matmuls per layer for nothing at inference.

bitsandbytes is an optional extra (`pip install '.[quantize]'`). Its CPU backend
(bitsandbytes >= 0.48) runs both kinds on a CPU, which is what the tests use;
on a GPU the weights are quantized when the module moves to the device.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Bits = Literal["8bit", "4bit"]
BITS: tuple[str, ...] = ("8bit", "4bit")
# Linear layers whose output must stay exact: the LM head gives the CPM's logits.
SKIP_MODULES: tuple[str, ...] = ("lm_head",)
INT8_THRESHOLD = 6.0


class QuantizationError(RuntimeError):
    """The LLM could not be quantized (bitsandbytes missing or unusable here)."""


def import_bitsandbytes():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise QuantizationError(
            f"--quantize needs bitsandbytes (the 'quantize' extra: pip install '.[quantize]'): {exc}") from None
    return bnb


def _quantized_linear(bnb, layer: nn.Linear, bits: str, compute_dtype: torch.dtype) -> nn.Module:
    has_bias = layer.bias is not None
    weight = layer.weight.data
    if bits == "8bit":
        q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=has_bias,
                                has_fp16_weights=False, threshold=INT8_THRESHOLD)
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=has_bias,
                              compute_dtype=compute_dtype, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if has_bias:
        q.bias = nn.Parameter(layer.bias.data, requires_grad=False)
    # Moving to the layer's own device performs the quantization (bitsandbytes
    # quantizes in Int8Params/Params4bit's `to`).
    return q.to(weight.device)


def quantize_llm(model: nn.Module, bits: str) -> int:
    """Replace the LLM's linear layers of `model` (a FakeReasoningModel) in place
    with bitsandbytes' 8-bit or 4-bit layers; returns how many were replaced.

    Raises QuantizationError when bitsandbytes is missing or none were replaced
    (a silent no-op would report full-precision memory as quantized)."""
    if bits not in BITS:
        raise QuantizationError(f"quantize: must be one of {', '.join(BITS)}, got {bits!r}")
    bnb = import_bitsandbytes()
    from modeling.llm import causal_lm, llm_dtype

    if hasattr(model.llm, "merge_and_unload"):
        model.llm = model.llm.merge_and_unload()
    lm = causal_lm(model.llm)
    compute_dtype = llm_dtype(model.llm)
    targets = [(name, m) for name, m in lm.named_modules()
               if type(m) is nn.Linear and name.rsplit(".", 1)[-1] not in SKIP_MODULES]
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = lm.get_submodule(parent_name) if parent_name else lm
        setattr(parent, child, _quantized_linear(bnb, layer, bits, compute_dtype))
    if not targets:
        raise QuantizationError("quantize: the LLM has no nn.Linear layer to quantize")
    return len(targets)


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers as stored: a quantized layer's
    packed weights at their packed size, plus its scales (8-bit: the per-row SCB;
    4-bit: the quant state's absmax), which bitsandbytes keeps beside the parameter."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        extras = [getattr(t, "SCB", None)]
        state = getattr(t, "quant_state", None)
        if state is not None:
            extras.append(getattr(state, "absmax", None))
        total += sum(x.numel() * x.element_size() for x in extras if isinstance(x, torch.Tensor))
    return total
