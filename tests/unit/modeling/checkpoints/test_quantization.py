"""--quantize on the tiny model, on the CPU (bitsandbytes' CPU backend): the LLM's
linear layers become 8-bit / 4-bit layers, their weights shrink, and p(fake) and the
answers stay close to the unquantized model's. The figures are printed (pytest -s)."""
import os

import pytest
import torch
from torch import nn

from modeling.checkpoints.quantization import QuantizationError, quantize_llm, weight_bytes

try:
    import bitsandbytes as bnb
except ImportError:  # make test installs the 'quantize' extra; CI must run these tests
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("needs the 'quantize' extra: pip install '.[quantize]'", allow_module_level=True)


def _linear_bytes(model) -> int:
    from modeling.llm import causal_lm

    lm = causal_lm(model.llm)
    return sum(weight_bytes(m) for n, m in lm.named_modules()
               if isinstance(m, (nn.Linear, bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
               and not n.endswith("lm_head"))


@pytest.mark.parametrize("bits,max_ratio,max_dp", [("8bit", 0.30, 0.02), ("4bit", 0.20, 0.05)])
def test_quantized_llm_is_smaller_and_agrees(tiny_checkpoint, bits, max_ratio, max_dp):
    from modeling.checkpoints.checkpoint import load_for_inference
    from modeling.template import build_prompt
    from sharding.schema import EVAL_QUESTION

    ref, tok = load_for_inference(tiny_checkpoint)
    q, _ = load_for_inference(tiny_checkpoint)
    before = _linear_bytes(q)
    replaced = quantize_llm(q, bits)
    after = _linear_bytes(q)
    kinds = {type(m).__name__ for m in q.llm.modules()}
    assert replaced > 0 and ("Linear8bitLt" if bits == "8bit" else "Linear4bit") in kinds
    assert type(q.llm.lm_head) is nn.Linear  # the CPM's logits stay exact
    torch.manual_seed(0)
    px = torch.randn(6, 3, ref.config.image_size, ref.config.image_size)
    prompt = [list(build_prompt(tok, EVAL_QUESTION)[0])] * 6
    p_ref = ref.score_p_fake(px, prompt)
    p_q = q.score_p_fake(px, prompt)
    a_ref = ref.generate(px, prompt, max_new_tokens=6)
    a_q = q.generate(px, prompt, max_new_tokens=6)
    agree = sum(x == y for x, y in zip(a_ref, a_q)) / len(a_ref)
    print(f"\n{bits}: LLM linear weights {before} -> {after} bytes (ratio {after / before:.3f}), "
          f"max |dp_fake| {float((p_ref - p_q).abs().max()):.4f}, answers identical {agree:.0%}")
    assert after / before <= max_ratio  # fp32 tiny model: 8-bit ~1/4, 4-bit ~1/8 plus scales
    assert float((p_ref - p_q).abs().max()) <= max_dp


def test_unknown_bits_is_an_error(tiny_model):
    with pytest.raises(QuantizationError, match="quantize"):
        quantize_llm(tiny_model[0], "3bit")
