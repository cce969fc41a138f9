"""Activation memory of a FakeReasoning training micro-step, counted from ModelConfig alone.

Pure arithmetic (no torch), like modeling.costs.flops; `fakereasoning-train --check
--plan` adds it to the ZeRO model states. Every term is a tensor that autograd
keeps for the backward (or that is live at the step's peak), counted in bytes
for a micro-batch of `b` samples of `L` LLM positions each (image tokens
included; the plan takes the longest a batch can be, data.max_length - 1 +
the image tokens). Symbols: d LLM width, kv its key/value width, F its MLP
width, h its heads, n its layers, r the LoRA rank, V the vocabulary; N image
tokens, D_t a tower's width, H the fusion's heads, H_d DINO's heads, m the
fusion's FFN multiple. Activations are in the training dtype (2 bytes for
bf16/fp16: `a`); a dropout mask is 1 byte per element on CUDA (fused
native_dropout keeps a bool mask) and `a` bytes on a CPU (the unfused path
keeps the scaled noise in the input's dtype).

Per LLM decoder layer and position (LLaMA with LoRA, frozen base):
- two RMSNorms: the float32 copy of the input (4d) and the 1/rms (4);
- each LoRA-adapted linear with dropout > 0: its dropout's output (a.in) and
  mask, and the A product (a.r); with dropout 0 the adapters share their input
  (one a.d per distinct input). The frozen base products keep nothing (no
  weight gradient, so no input);
- attention: rotated q (a.d) and k (a.kv), v (a.kv), the output (a.d) and
  the log-sum-exp (4h); sdpa also keeps the float mask it builds from the
  boolean padding mask for every layer: a.L per position (a.L^2 per sample);
  eager keeps the float32 softmax and its cast (6.h.L per position);
- MLP: gate and up outputs, SiLU output (3.a.F); down's dropout output and
  mask on the F-wide input.
With gradient checkpointing a layer keeps only its input (a.d) and its
arguments (the boolean padding mask, b.L^2 bytes, and the position ids,
shared by all layers), and the text embeddings stay (a.d per text position:
transformers makes them require grad so that the gradient reaches the
checkpointed layers); one layer's activations come back during its
backward, after the logits' memory is gone (recompute_bytes).

Outside the layers, per sample:
- the final RMSNorm's float32 copy (4d + 4 per position);
- the logits: 14V per position at the start of the backward: the float32
  log-probabilities cross-entropy keeps (4V) and 10V of float32 and bf16
  gradients of the logits being formed (the fake step's Temp category at its
  peak is exactly 10V.b.L);
- image side (trained projectors and fusion; towers frozen and run without
  grad): each projector keeps its tower's hidden state (a.(N+1).D_t) and
  2.a.N.d; the fusion's attention-bias network keeps DINO's map and two
  2H_d-channel maps (5.a.H_d.N^2); its cross-attention, whose bias is trained,
  keeps 12.N.d + 12.H.N^2 on the CPU (the float32 math kernel: q, k, v,
  softmax, dropout mask and output) and a.(4.N.d + H.N^2) + 4.H.N on CUDA's
  memory-efficient kernel (q, k, v, output, the bias, the log-sum-exp); its
  projections, layer norms and FFN a.(6 + 2m).N.d, plus dropout masks.

modeling/costs/fake_step.py measures the same step under FakeTensorMode on a CPU:
the CPU variant (device="cpu") equals its peak to a few bytes per micro-batch
(tests/unit/modeling/costs/test_memory.py, benchmarks/plan_check.py). What only a GPU
can check: the CUDA variant's 1-byte dropout masks and memory-efficient fusion
attention. Not checked at all: LoRA dropout 0, a full fine-tune (lora.enabled
false) and eager attention.
"""
from __future__ import annotations

from dataclasses import dataclass

from modeling.config import ModelConfig
from modeling.costs.flops import LLAMA_LINEARS, _lora_targets

# Which tensor each LLaMA linear takes as input (adapters with dropout 0 share it).
_LINEAR_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
                 "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "act"}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class ActTerm:
    """Bytes of one group of kept tensors for a micro-batch."""

    component: str
    """llm_layers, llm_head, image_side or rotary."""
    name: str
    """What is kept."""
    bytes: float
    """Bytes for the whole micro-batch."""
    formula: str
    """How it is counted (symbols of the module docstring)."""


def _width(cfg: ModelConfig) -> tuple[int, int, int, int]:
    llm = cfg.llm
    d, heads = llm.hidden_size, llm.num_heads
    kv = (llm.num_kv_heads or heads) * (d // heads)
    return d, kv, llm.intermediate_size, heads


def layer_bytes_per_sample(cfg: ModelConfig, positions: int, device: str = "cuda") -> tuple[float, str]:
    """(bytes, formula) one LLM decoder layer keeps for one sample without checkpointing."""
    a = DTYPE_BYTES[cfg.dtype]
    mask = 1 if device == "cuda" else a
    d, kv, f, h = _width(cfg)
    widths = {"attn_in": d, "attn_out": d, "mlp_in": d, "act": f}
    L = positions
    per_tok = 2 * (4 * d + 4)
    parts = ["2(4d+4) norms"]
    targets = _lora_targets(cfg) & set(LLAMA_LINEARS)
    if cfg.lora.enabled and cfg.lora.dropout > 0:
        per_tok += sum((a + mask) * widths[_LINEAR_INPUT[t]] + a * cfg.lora.r for t in targets)
        parts.append(f"LoRA dropout out+mask ({a}+{mask}).in and {a}r on {len(targets)} linears")
    else:
        shared = {_LINEAR_INPUT[t] for t in targets} if cfg.lora.enabled else set(widths)
        per_tok += sum(a * widths[g] for g in shared) + a * cfg.lora.r * len(targets)
        parts.append("shared linear inputs")
    per_tok += a * (2 * d + 2 * kv) + 4 * h
    parts.append(f"attention {a}(2d+2kv)+4h")
    per_tok += 3 * a * f
    parts.append(f"MLP 3.{a}.F")
    per_sample = per_tok * L
    attn = cfg.llm.attn_implementation
    if attn == "sdpa":
        per_sample += a * L * L
        parts.append(f"sdpa float mask {a}.L^2")
    elif attn == "eager":
        per_sample += 6 * h * L * L
        parts.append("eager softmax 6.h.L^2")
    return float(per_sample), " + ".join(parts)


def _image_terms(cfg: ModelConfig, b: int, device: str) -> list[ActTerm]:
    a = DTYPE_BYTES[cfg.dtype]
    mask = 1 if device == "cuda" else a
    n, d = cfg.num_image_tokens, cfg.llm.hidden_size
    hf, hd, m = cfg.fusion.num_heads, cfg.dino.num_heads, cfg.fusion.ffn_mult
    proj = sum(a * (n + 1) * t.hidden_size + 2 * a * n * d for t in (cfg.clip, cfg.dino))
    bias = a * hd * n * n + 2 * (a * 2 * hd * n * n)  # DINO's map, the conv's output and GELU's
    if device == "cuda":
        # Memory-efficient attention with a trained bias: q, k, v, output, the bias, the log-sum-exp.
        attn = 8 * a * n * d // 2 + a * hf * n * n + 4 * hf * n
        attn_formula = f"{a}(4Nd)+{a}HN^2+4HN (memory-efficient kernel)"
    else:
        # CPU math path in float32: q, k^T, v, softmax, dropout mask and output.
        attn = 12 * n * d + 12 * hf * n * n
        attn_formula = "12Nd+12HN^2 (float32 math kernel)"
    drop = cfg.fusion.dropout > 0
    # q/k/v inputs, out_proj input, the two LayerNorms' inputs and the FFN's up input: 6 a.N.d;
    # the relu output and the down input: 2 a.m.N.d; dropout masks on att, ffn hidden and ffn out.
    rest = 6 * a * n * d + 2 * a * m * n * d + (mask * (2 * n * d + m * n * d) if drop else 0) + 4 * a * n
    return [
        ActTerm("image_side", "projectors", b * proj, f"b.sum_t({a}(N+1)D_t + 2.{a}.N.d)"),
        ActTerm("image_side", "fusion attention bias", b * bias, f"b.{5 * a}.H_d.N^2"),
        ActTerm("image_side", "fusion attention", b * attn, "b." + attn_formula),
        ActTerm("image_side", "fusion projections, norms, FFN", b * rest,
                f"b.({6 * a}+{2 * a}m)Nd + masks"),
    ]


def activation_terms(cfg: ModelConfig, micro_batch: int, positions: int, gradient_checkpointing: bool,
                     vocab_size: int | None = None, device: str = "cuda") -> list[ActTerm]:
    """Every group of activations live at the micro-step's peak (see the module docstring)."""
    if not (cfg.clip.freeze and cfg.dino.freeze):
        raise ValueError("the activation count assumes frozen towers (model.clip.freeze and model.dino.freeze)")
    vocab = vocab_size if vocab_size is not None else cfg.llm.vocab_size
    if not vocab:
        raise ValueError("the vocabulary size is unknown: pass vocab_size (model.llm.vocab_size is null)")
    a = DTYPE_BYTES[cfg.dtype]
    b, L, n_layers = micro_batch, positions, cfg.llm.num_layers
    d = cfg.llm.hidden_size
    layer, layer_formula = layer_bytes_per_sample(cfg, L, device)
    if gradient_checkpointing:
        layers = [ActTerm("llm_layers", "checkpointed layer inputs", float(b * n_layers * a * d * L),
                          f"b.n.{a}.d.L")]
        # Every checkpointed layer keeps its arguments: one boolean mask and the position ids for all.
        mask = b * L * L if cfg.llm.attn_implementation in ("sdpa", "eager") else 0
        layers.append(ActTerm("llm_layers", "checkpoint arguments (bool mask, position ids)",
                              float(mask + 8 * L), "b.L^2 + 8L" if mask else "8L"))
        # transformers' gradient_checkpointing_enable makes the (frozen) input embeddings'
        # output require grad (enable_input_require_grads): a leaf the graph keeps to the backward.
        text = L - cfg.num_image_tokens + 1
        layers.append(ActTerm("llm_layers", "text embeddings (a leaf under checkpointing)",
                              float(b * a * d * text), f"b.{a}.d.(L-N+1)"))
    else:
        layers = [ActTerm("llm_layers", "decoder layers", b * n_layers * layer, f"b.n.L.({layer_formula})")]
    head = [ActTerm("llm_head", "final norm", float(b * (4 * d + 4) * L), "b.(4d+4).L"),
            ActTerm("llm_head", "logits", float(b * 14 * vocab * L), "b.14.V.L (float32 log-probs, gradients)")]
    rotary = [ActTerm("rotary", "rotary cos/sin", float(2 * a * L * (d // cfg.llm.num_heads)), f"2.{a}.L.d/h")]
    return layers + head + _image_terms(cfg, b, device) + rotary


def activation_bytes(cfg: ModelConfig, micro_batch: int, positions: int, gradient_checkpointing: bool,
                     vocab_size: int | None = None, device: str = "cuda") -> float:
    """Peak activation bytes of one micro-step (the sum of activation_terms)."""
    return sum(t.bytes for t in activation_terms(cfg, micro_batch, positions, gradient_checkpointing,
                                                  vocab_size, device))


def recompute_bytes(cfg: ModelConfig, micro_batch: int, positions: int, device: str = "cuda") -> float:
    """With gradient checkpointing: one layer's activations recomputed during its backward.
    They come back after the logits' memory is freed, so the peak is the larger of the two."""
    return micro_batch * layer_bytes_per_sample(cfg, positions, device)[0]


def tower_forward_bytes(cfg: ModelConfig, micro_batch: int) -> float:
    """The frozen towers' forward (no grad): CLIP's hidden states of every layer
    (kept for select_layer), DINO's last attention map and one layer's working set.
    Transient: it ends before the LLM runs, so it adds to the peak only when larger."""
    a = DTYPE_BYTES[cfg.dtype]
    t_len = cfg.num_image_tokens + 1
    out = 0
    for t in (cfg.clip, cfg.dino):
        working = a * t_len * (4 * t.hidden_size + 2 * t.intermediate_size) + a * t.num_heads * t_len * t_len
        out += working
    out += a * (cfg.clip.num_layers + 1) * t_len * cfg.clip.hidden_size + a * cfg.dino.num_heads * t_len * t_len
    return float(micro_batch * out)
