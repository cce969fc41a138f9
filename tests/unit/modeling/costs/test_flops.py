"""modeling.costs.flops: a hand count of the tiny model, the counts of torch's own FLOP
counter on a real forward and backward of the tiny model, the paper shape
against its known parameter counts, and the GPU peak table."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from modeling.costs import flops
from modeling.config import ModelConfig
from modeling.model import FakeReasoningModel
from modeling.template import build_training_example
from modeling.tokenization.tokenizer import build_bpe_tokenizer, demo_corpus

torch.set_num_threads(1)
QUESTION = "Is this image real or fake?"
ANSWER = "<REASONING> The texture looks unnatural. </REASONING> <CONCLUSION> This image is fake. </CONCLUSION>"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = demo_corpus(["Low Image Quality", "High Image Quality"], [QUESTION])
    return build_bpe_tokenizer(corpus, tmp_path_factory.mktemp("tok"), vocab_size=400)


def test_hand_count_of_the_tiny_model():
    """The tiny preset's products written out shape by shape, for 2 samples of 73
    LLM positions and a 400-token vocabulary (2 FLOPs per multiply-add)."""
    cfg = ModelConfig.preset("tiny")
    B, L, V = 2, 73, 400
    N, T = 16, 17  # (56 / 14)^2 image tokens; + the class token in the towers
    # CLIP: width 64, MLP 128, 2 layers; patch conv 3x14x14 -> 64 on 16 patches.
    clip_layer = 2 * T * 64 * 64 * 4 + 2 * T * 64 * 128 * 2 + 2 * T * T * 64 * 2
    clip = 2 * N * (3 * 14 * 14) * 64 + 2 * clip_layer
    # DINOv2: width 64, MLP 256, 2 layers, plus the last block's q.k^T for the attention map.
    dino_layer = 2 * T * 64 * 64 * 4 + 2 * T * 64 * 256 * 2 + 2 * T * T * 64 * 2
    dino = 2 * N * (3 * 14 * 14) * 64 + 2 * dino_layer + 2 * T * T * 64
    # Each projector: 64 -> 64 -> 64 on 16 tokens; forward, then a weight-only
    # gradient for the first linear (its input is a frozen tower's) and both for the second.
    proj_fwd = 2 * N * 64 * 64 + 2 * N * 64 * 64
    proj_bwd = 2 * N * 64 * 64 * 1 + 2 * N * 64 * 64 * 2
    # Fusion: 1x1 convs 4 -> 8 -> 4 heads on the 16x16 map, q/k/v/o 64x64, attention, FFN 64 -> 256 -> 64.
    fusion_fwd = (2 * N * N * 4 * 8 + 2 * N * N * 8 * 4 + 4 * 2 * N * 64 * 64 + 2 * 2 * N * N * 64
                  + 2 * 2 * N * 64 * 256)
    fusion_bwd = 2 * fusion_fwd - 2 * N * N * 4 * 8  # the first conv's input (log attention map) needs no gradient
    # LLM: width 64, 4 heads of 16, 2 key/value heads (k, v: 64 -> 32), MLP 128, 2 layers;
    # LoRA r=8 on the seven linears; lm_head 64 -> 400.
    base = 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128)
    lora = 2 * 8 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + 3 * (64 + 128))
    attention = 2 * 2 * L * 64  # per position: scores and values over the full L x L square
    llm_fwd = B * L * (2 * (base + lora + attention) + 2 * 64 * V)
    # Frozen base and lm_head: activation gradients only (1x); LoRA and attention: both operands (2x).
    llm_bwd = B * L * (2 * (base + 2 * lora + 2 * attention) + 2 * 64 * V)

    got = flops.component_flops(cfg, [L] * B, vocab_size=V)
    assert got["clip_tower"] == {"forward": B * clip, "backward": 0}
    assert got["dino_tower"] == {"forward": B * dino, "backward": 0}
    for p in ("clip_projector", "dino_projector"):
        assert got[p] == {"forward": B * proj_fwd, "backward": B * proj_bwd}
    assert got["fusion"] == {"forward": B * fusion_fwd, "backward": B * fusion_bwd}
    assert got["llm"] == {"forward": llm_fwd, "backward": llm_bwd}
    total = B * (clip + dino + 2 * (proj_fwd + proj_bwd) + fusion_fwd + fusion_bwd) + llm_fwd + llm_bwd
    assert flops.step_flops(cfg, V).for_lengths([L] * B) == total


def _module_flops(counter: FlopCounterMode, name: str) -> int:
    return sum(counter.get_flop_counts().get(name, {}).values())


LLM_MODULE = {True: "FakeReasoningModel.llm.base_model.model", False: "FakeReasoningModel.llm"}


@pytest.mark.parametrize("variant", ["lora", "full_finetune", "towers_trained"])
def test_counts_equal_torch_flop_counter_on_a_real_step(tokenizer, variant):
    """torch.utils.flop_counter on the tiny model's forward (per component) and
    backward (in all: its per-module attribution of backward ops is unreliable).
    Eager attention everywhere: the counter has no formula for sdpa's CPU flash
    kernel. Samples of different lengths, so the per-sample L_i^2 matters."""
    cfg = ModelConfig.preset("tiny")
    for part in (cfg.clip, cfg.dino, cfg.llm):
        part.attn_implementation = "eager"
    cfg.fusion.attn_implementation = "eager"
    cfg.lora.enabled = variant != "full_finetune"
    if variant == "towers_trained":
        cfg.clip.freeze = cfg.dino.freeze = False
    torch.manual_seed(0)
    model = FakeReasoningModel.from_config(cfg, tokenizer).train()
    exs = [build_training_example(tokenizer, QUESTION, a) for a in (ANSWER, "<CONCLUSION> This image is real.")]
    t = max(len(e.input_ids) for e in exs)
    ids = torch.full((2, t), tokenizer.pad_token_id)
    labels = torch.full((2, t), -100)
    mask = torch.zeros((2, t), dtype=torch.long)
    for i, e in enumerate(exs):
        ids[i, :len(e.input_ids)], labels[i, :len(e.labels)], mask[i, :len(e.input_ids)] = (
            torch.tensor(e.input_ids), torch.tensor(e.labels), 1)
    batch = dict(pixel_values=torch.randn(2, 3, 56, 56), input_ids=ids, attention_mask=mask, labels=labels,
                 forgery_labels=torch.tensor([1, 0]))

    with FlopCounterMode(display=False) as fwd:
        out = model(**batch)
    with FlopCounterMode(display=False) as bwd:
        out.loss.backward()

    # The right-padded batch computes every position; the count is for the padded
    # length, which is what the hardware ran (model FLOPs of real tokens are below).
    padded = [t - 1 + cfg.num_image_tokens] * 2
    want = flops.component_flops(cfg, padded, vocab_size=len(tokenizer))
    for comp in ("clip_tower", "dino_tower", "clip_projector", "dino_projector", "fusion"):
        assert _module_flops(fwd, f"FakeReasoningModel.{comp}") == want[comp]["forward"], comp
    assert _module_flops(fwd, LLM_MODULE[cfg.lora.enabled]) == want["llm"]["forward"]
    assert fwd.get_total_flops() == sum(c["forward"] for c in want.values())
    assert bwd.get_total_flops() == sum(c["backward"] for c in want.values())
    assert flops.step_flops(cfg, len(tokenizer)).for_lengths(padded) == (
        fwd.get_total_flops() + bwd.get_total_flops())
    if variant == "towers_trained":
        assert want["clip_tower"]["backward"] > 0 and want["dino_tower"]["backward"] > 0
    # The real (unpadded) lengths cost less than the padded batch the hardware ran.
    real = [flops.llm_positions(len(e.input_ids), cfg) for e in exs]
    assert real[1] < real[0] == padded[0]
    assert flops.step_flops(cfg, len(tokenizer)).for_lengths(real) < fwd.get_total_flops() + bwd.get_total_flops()


def test_paper_shape_matches_its_parameter_counts():
    """LLaMA-13B: 40 layers x (4 x 5120^2 + 3 x 5120 x 13824) linear weights plus a
    5120 x 32000 lm_head; LoRA r=128 on every linear: 500,695,040 adapter weights
    (modeling.costs.summary's 500.7M). A forward is 2 FLOPs per weight per token."""
    cfg = ModelConfig.preset("paper")
    terms = flops.matmul_terms(cfg)
    per_token = {m.name: m.forward for m in terms if m.per == flops.PER_TOKEN}
    lora = sum(v for k, v in per_token.items() if k.endswith(".lora"))
    base = sum(v for k, v in per_token.items() if not k.endswith(".lora"))
    assert base == 2 * (40 * (4 * 5120 ** 2 + 3 * 5120 * 13824) + 5120 * 32000)
    assert lora == 2 * 500_695_040
    s = flops.step_flops(cfg)
    # Frozen base: forward + activation gradients (2x); LoRA 3x.
    assert s.per_token == 2 * base + 3 * lora
    assert s.per_token_pair == 3 * 40 * 4 * 5120
    # A 2k-position sample: LLM ~ 2 x 2 x 13B per token dominates; the towers
    # (2 x 0.3B ViT-L at 577 tokens, forward only) are a few percent.
    image_side = s.per_sample
    llm_side = s.for_lengths([2048]) - image_side
    assert 0.01 < image_side / llm_side < 0.1


def test_peak_table_matches_device_names():
    names = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
             "NVIDIA H200": 989.0, "NVIDIA H800": 989.0, "NVIDIA A100-SXM4-80GB": 312.0,
             "NVIDIA A100 80GB PCIe": 312.0, "NVIDIA A800-SXM4-80GB": 312.0, "NVIDIA L40S": 362.0,
             "NVIDIA L40": 181.0, "NVIDIA L4": 121.0, "NVIDIA A10": 125.0, "Tesla V100-SXM2-32GB": 125.0,
             "NVIDIA H20": 148.0, "NVIDIA GH200 480GB": 989.0}
    assert {n: flops.peak_tflops(n) for n in names} == names
    assert flops.peak_tflops("NVIDIA GeForce GTX 1080") is None and flops.peak_tflops("cpu") is None
    # Every table entry is reachable by some name pattern.
    assert {flops.known_gpu(k.replace("-", " ")) for k in flops.PEAK_TFLOPS} == set(flops.PEAK_TFLOPS)


def test_vocabulary_must_be_known():
    cfg = ModelConfig.preset("tiny")
    assert cfg.llm.vocab_size is None
    with pytest.raises(ValueError, match="vocab_size"):
        flops.step_flops(cfg)
