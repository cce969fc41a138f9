"""Model FLOPs of a FakeReasoning training step, counted from ModelConfig alone.

Pure arithmetic (no torch), so the training loop, the GPU check and a test can
all use it. It feeds `perf/mfu` = model FLOPs of a step / (step time x ranks x
peak FLOP/s of one device).

What is counted
---------------
Matrix products only (linear layers, convolutions, attention's two batched
products), 2 FLOPs per multiply-add, as torch.utils.flop_counter and the
MFU literature (PaLM, appendix B) count; norms, activations, softmax, rotary
and losses are left out. Every product is listed by `matmul_terms` with its
forward FLOPs and how many operand gradients its backward computes
(`grads`); a backward costs `grads` x the forward (each operand gradient is one
product of the same size):

- Frozen towers (CLIP, DINOv2: run under no_grad): forward only, grads 0.
  CLIP runs all its layers (the last one too, although LLaVA's select_layer=-2
  leaves its output unused): the model computes it, so it is counted. DINOv2's
  last-block attention map adds one q.k^T product (the fusion's bias input).
  A tower with freeze=false is counted as trained: grads 2, except its patch
  convolution (1: its input is the pixels) and CLIP's layers after
  select_layer (0: nothing reads their output, so no backward reaches them).
- Projectors and fusion (trained): forward and backward. Their first products
  take a frozen tower's output (projector's first linear, the fusion bias_net's
  first 1x1 convolution on DINO's attention map), which needs no gradient: grads 1
  (weight only); every other product grads 2 (weight and input), i.e. the
  familiar 3x forward.
- LLM with LoRA: the frozen base products (q, k, v, o, gate, up, down, lm_head)
  need only the gradient of their input (the activation gradient flows back to
  the fusion): grads 1, no weight-gradient product. The LoRA adapters A (in->r)
  and B (r->out) on the targeted linears: grads 2 (3x their forward).
  Attention's scores (Q.K^T) and values (P.V) products: grads 2 (both operands
  are activations). Without LoRA the base products are trained: grads 2.
  The embedding lookup is not a product.

Conventions
-----------
- Attention is counted over the full L x L square, not halved for the causal
  mask: 4.L^2.d forward per layer (PaLM's 12.L.T.d per token over forward and
  backward). The kernels (sdpa's flash path) skip most of the masked half, so
  MFU under this convention can read higher than the FLOPs the GPU executed.
- Padding: a step's FLOPs are those of its samples' real positions (text
  tokens plus the image tokens spliced in for the placeholder), each sample at
  its own length L_i, so padding is waste that lowers MFU (and shows in
  perf/padding_frac), as in standard MFU: the FLOPs the model must do for the
  useful tokens.
- Gradient checkpointing recomputes the LLM layers' forward in the backward;
  that is hardware FLOPs, not model FLOPs, and is not counted (MFU, not HFU).

Per sample i with L_i LLM positions, the step's FLOPs are linear in three
sums, which the loop all-reduces:

    train_flops = per_sample x B + per_token x sum_i L_i + per_token_pair x sum_i L_i^2

Hand formulas (forward; d LLM width, F its MLP width, kv its key/value width,
V vocabulary, n layers; towers with D, F_t, n_t; N image tokens, T = N + 1):

    LLM per token:   n.(2.d.d [q] + 2.2.d.kv [k, v] + 2.d.d [o] + 3.2.d.F [MLP]) + 2.d.V [lm_head]
                     + LoRA per adapted linear (in, out): 2.r.(in + out)
    LLM per pair:    n.4.d                             (scores and values products)
    tower:           2.N.(3.p^2).D [patch conv] + n_t.(8.T.D^2 + 4.T.D.F_t + 4.T^2.D)
    projector:       2.N.D.d + 2.N.d.d
    fusion:          2.N^2.Hd.2Hd + 2.N^2.2Hd.Hf [bias 1x1 convs] + 8.N.d^2 [q, k, v, o]
                     + 4.N^2.d [attention] + 4.N.d.(m.d) [FFN]

The peak FLOP/s of known GPUs (`PEAK_TFLOPS`, dense bf16/fp16 tensor-core
figures from NVIDIA's datasheets, without the 2:4 sparsity doubling) and the
match of a torch.cuda device name against them are here too (plain data).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from modeling.config import ModelConfig

PER_SAMPLE, PER_TOKEN, PER_TOKEN_PAIR = "sample", "token", "token_pair"
COMPONENTS = ("clip_tower", "dino_tower", "clip_projector", "dino_projector", "fusion", "llm")
# The LLaMA linears peft's "all-linear" adapts (every nn.Linear but lm_head).
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Matmul:
    """One matrix product of the model (or a group of identical ones)."""

    component: str
    """Which part of the model runs it (one of COMPONENTS)."""
    name: str
    """What it is, e.g. "layers.q_proj" (all layers together)."""
    forward: int
    """Forward FLOPs per unit of `per`."""
    per: str
    """PER_SAMPLE (image side), PER_TOKEN (LLM position) or PER_TOKEN_PAIR (L^2 of a sample)."""
    grads: int
    """Operand gradients its backward computes (0 frozen, 1 input or weight only, 2 both)."""

    @property
    def backward(self) -> int:
        return self.forward * self.grads


@dataclass(frozen=True)
class StepFlops:
    """Training FLOPs (forward + backward) as coefficients of a batch's three sums."""

    per_sample: float
    per_token: float
    per_token_pair: float

    def train_flops(self, samples: float, tokens: float, tokens_sq: float) -> float:
        """samples: images; tokens: sum of the samples' LLM positions L_i; tokens_sq: sum of L_i^2."""
        return self.per_sample * samples + self.per_token * tokens + self.per_token_pair * tokens_sq

    def for_lengths(self, lengths) -> float:
        """Training FLOPs of samples with these LLM lengths (real positions, image tokens included)."""
        lengths = list(lengths)
        return self.train_flops(len(lengths), sum(lengths), sum(x * x for x in lengths))


def llm_positions(text_tokens: int, cfg: ModelConfig) -> int:
    """LLM positions of a sample with `text_tokens` real tokens (one <image> placeholder among them)."""
    return text_tokens - 1 + cfg.num_image_tokens


def _tower_terms(component: str, t, image_size: int, used_layers: int, extra_map: bool) -> list[Matmul]:
    """A ViT tower's products; `used_layers` of its layers feed the model's output
    (the rest run forward only: their output is never read, so no backward reaches them)."""
    n = (image_size // t.patch_size) ** 2
    seq = n + 1  # the class token
    d, f = t.hidden_size, t.intermediate_size
    trained = not t.freeze
    out = [Matmul(component, "patch_embedding", 2 * n * 3 * t.patch_size ** 2 * d, PER_SAMPLE,
                  1 if trained else 0)]  # its input is the pixels: a weight gradient only
    groups = ((used_layers, "layers", 2 if trained else 0), (t.num_layers - used_layers, "unused_layers", 0))
    for count, name, g in groups:
        if count:
            out += [Matmul(component, f"{name}.qkvo", count * 4 * 2 * seq * d * d, PER_SAMPLE, g),
                    Matmul(component, f"{name}.mlp", count * 2 * 2 * seq * d * f, PER_SAMPLE, g),
                    Matmul(component, f"{name}.attention", count * 2 * 2 * seq * seq * d, PER_SAMPLE, g)]
    if extra_map:
        # The last block's q.k^T again, for the softmax map the fusion biases with.
        out.append(Matmul(component, "last_block_attention_map", 2 * seq * seq * d, PER_SAMPLE,
                          2 if trained else 0))
    return out


def _lora_targets(cfg: ModelConfig) -> set[str]:
    if not cfg.lora.enabled:
        return set()
    tm = cfg.lora.target_modules
    if tm == "all-linear":
        return set(LLAMA_LINEARS)
    # peft matches a module name ending in the given suffix; names other than
    # the LLaMA linears (and lm_head) adapt nothing in this model.
    return {x.rsplit(".", 1)[-1] for x in tm} & (set(LLAMA_LINEARS) | {"lm_head"})


def matmul_terms(cfg: ModelConfig, vocab_size: int | None = None) -> list[Matmul]:
    """Every matrix product of one training sample, by component (see the module docstring).

    vocab_size: rows of the LLM's embedding / lm_head (the tokenizer's length for a
    random-init LLM); None takes cfg.llm.vocab_size.
    """
    vocab = vocab_size if vocab_size is not None else cfg.llm.vocab_size
    if not vocab:
        raise ValueError("the vocabulary size is unknown: pass vocab_size (model.llm.vocab_size is null)")
    n_img = cfg.num_image_tokens
    c = cfg.clip
    # hidden_states[select_layer]: entry 0 is the embeddings, entry k the output of layer k.
    clip_used = c.select_layer if c.select_layer >= 0 else c.num_layers + 1 + c.select_layer
    terms = _tower_terms("clip_tower", c, cfg.image_size, clip_used, extra_map=False)
    terms += _tower_terms("dino_tower", cfg.dino, cfg.image_size, cfg.dino.num_layers, extra_map=True)

    w = cfg.llm.hidden_size
    for comp, tower in (("clip_projector", cfg.clip), ("dino_projector", cfg.dino)):
        first_grads = 1 if tower.freeze else 2  # its input is the frozen tower's output
        terms += [Matmul(comp, "0", 2 * n_img * tower.hidden_size * w, PER_SAMPLE, first_grads),
                  Matmul(comp, "2", 2 * n_img * w * w, PER_SAMPLE, 2)]

    f, hd = cfg.fusion, cfg.dino.num_heads
    terms += [
        Matmul("fusion", "bias_net.0", 2 * n_img * n_img * hd * 2 * hd, PER_SAMPLE, 1 if cfg.dino.freeze else 2),
        Matmul("fusion", "bias_net.2", 2 * n_img * n_img * 2 * hd * f.num_heads, PER_SAMPLE, 2),
        Matmul("fusion", "qkvo", 4 * 2 * n_img * w * w, PER_SAMPLE, 2),
        Matmul("fusion", "attention", 2 * 2 * n_img * n_img * w, PER_SAMPLE, 2),
        Matmul("fusion", "ffn", 2 * 2 * n_img * w * f.ffn_mult * w, PER_SAMPLE, 2),
    ]

    llm = cfg.llm
    kv = (llm.num_kv_heads or llm.num_heads) * (w // llm.num_heads)
    shapes = {"q_proj": (w, w), "k_proj": (w, kv), "v_proj": (w, kv), "o_proj": (w, w),
              "gate_proj": (w, llm.intermediate_size), "up_proj": (w, llm.intermediate_size),
              "down_proj": (llm.intermediate_size, w)}
    base_grads = 1 if cfg.lora.enabled else 2  # frozen base: only the activation gradient
    targets = _lora_targets(cfg)
    layers = llm.num_layers
    for name, (fan_in, fan_out) in shapes.items():
        terms.append(Matmul("llm", f"layers.{name}", layers * 2 * fan_in * fan_out, PER_TOKEN, base_grads))
        if name in targets:
            terms.append(Matmul("llm", f"layers.{name}.lora", layers * 2 * cfg.lora.r * (fan_in + fan_out),
                                PER_TOKEN, 2))
    terms.append(Matmul("llm", "layers.attention", layers * 2 * 2 * w, PER_TOKEN_PAIR, 2))
    terms.append(Matmul("llm", "lm_head", 2 * w * vocab, PER_TOKEN, base_grads))
    if "lm_head" in targets:
        terms.append(Matmul("llm", "lm_head.lora", 2 * cfg.lora.r * (w + vocab), PER_TOKEN, 2))
    return terms


def step_flops(cfg: ModelConfig, vocab_size: int | None = None) -> StepFlops:
    """Training FLOPs per sample, per LLM position and per (sample's) position pair."""
    sums = {PER_SAMPLE: 0, PER_TOKEN: 0, PER_TOKEN_PAIR: 0}
    for m in matmul_terms(cfg, vocab_size):
        sums[m.per] += m.forward + m.backward
    return StepFlops(float(sums[PER_SAMPLE]), float(sums[PER_TOKEN]), float(sums[PER_TOKEN_PAIR]))


def component_flops(cfg: ModelConfig, lengths, vocab_size: int | None = None) -> dict[str, dict[str, int]]:
    """{component: {"forward": FLOPs, "backward": FLOPs}} of samples with these LLM lengths."""
    lengths = list(lengths)
    units = {PER_SAMPLE: len(lengths), PER_TOKEN: sum(lengths), PER_TOKEN_PAIR: sum(x * x for x in lengths)}
    out = {c: {"forward": 0, "backward": 0} for c in COMPONENTS}
    for m in matmul_terms(cfg, vocab_size):
        out[m.component]["forward"] += m.forward * units[m.per]
        out[m.component]["backward"] += m.backward * units[m.per]
    return out


# --------------------------------------------------------------------------- peak FLOP/s

# Dense bf16 (fp16 on V100/T4, which lack bf16) tensor-core peaks in TFLOP/s of
# one device, from NVIDIA's datasheets; the datasheets print the 2:4-sparsity
# figure with an asterisk, twice these. Order matters: the first pattern that
# matches the device name wins (H100 PCIe/NVL before H100, L40S before L40, ...).
PEAK_TFLOPS: dict[str, float] = {
    "B200": 2250.0,       # HGX B200: 4.5 PFLOPS sparse per GPU
    "H200-NVL": 835.0,    # H200 NVL: 1,671 sparse
    "H200": 989.0,        # H200 SXM: 1,979 sparse
    "GH200": 989.0,       # GH200 Grace Hopper (H100-class GPU): 1,979 sparse
    "H100-PCIe": 756.0,   # H100 PCIe: 1,513 sparse
    "H100-NVL": 835.0,    # H100 NVL: 1,671 sparse per GPU
    "H100": 989.0,        # H100 SXM5: 1,979 sparse
    "H800-PCIe": 756.0,   # H800 PCIe: as H100 PCIe
    "H800": 989.0,        # H800 SXM5: as H100 SXM
    "H20": 148.0,         # H20: 296 sparse
    "A100": 312.0,        # A100 SXM4 and PCIe, 40 and 80 GB: 624 sparse
    "A800": 312.0,        # A800: as A100
    "L40S": 362.0,        # L40S: 733 sparse (362.05 dense)
    "L40": 181.0,         # L40: 362 sparse
    "L4": 121.0,          # L4: 242 sparse
    "A40": 150.0,         # A40: 299.4 sparse
    "A10": 125.0,         # A10: 250 sparse
    "A6000": 155.0,       # RTX A6000: 309.7 sparse
    "V100": 125.0,        # V100 SXM2: 125 fp16 tensor (no bf16; PCIe 112)
    "T4": 65.0,           # T4: 65 fp16 tensor (no bf16)
}
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    ("B200", r"\bB200\b"),
    ("H200-NVL", r"\bH200\b.*\bNVL\b"),
    ("GH200", r"\bGH200\b"),
    ("H200", r"\bH200\b"),
    ("H100-PCIe", r"\bH100\b.*\bPCIe\b"),
    ("H100-NVL", r"\bH100\b.*\bNVL\b"),
    ("H100", r"\bH100\b"),
    ("H800-PCIe", r"\bH800\b.*\bPCIe\b"),
    ("H800", r"\bH800\b"),
    ("H20", r"\bH20\b"),
    ("A100", r"\bA100\b"),
    ("A800", r"\bA800\b"),
    ("L40S", r"\bL40S\b"),
    ("L40", r"\bL40\b"),
    ("L4", r"\bL4\b"),
    ("A40", r"\bA40\b"),
    ("A10", r"\bA10\b"),
    ("A6000", r"\bA6000\b"),
    ("V100", r"\bV100\b"),
    ("T4", r"\bT4\b"),
)


def known_gpu(device_name: str) -> str | None:
    """The PEAK_TFLOPS key of a torch.cuda.get_device_name() string, or None.

    >>> known_gpu("NVIDIA H100 80GB HBM3"), known_gpu("NVIDIA A100-SXM4-80GB"), known_gpu("NVIDIA A10")
    ('H100', 'A100', 'A10')
    """
    for key, pattern in _NAME_PATTERNS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return key
    return None


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16/fp16 peak TFLOP/s of a device name (None: not a GPU in PEAK_TFLOPS)."""
    key = known_gpu(device_name)
    return PEAK_TFLOPS[key] if key is not None else None
