"""The peak memory of one training micro-step, measured without allocating.

torch's FakeTensorMode runs the real forward and backward of the model's own
modules (every shape and dtype, at any size, the 13B paper shape included) on a
CPU with tensors that have no storage, and
torch.distributed._tools.mem_tracker.MemTracker records what would be live at
each moment, by category (parameters, gradients, activations, temporaries).
This is what modeling/costs/memory.py's activation formula is checked against.

What runs: the model is built on the meta device (no weights) and its
parameters are replaced by fake tensors in the training dtype. Then, as
FakeReasoningModel.forward does: the frozen towers (no grad), the projectors
and the fusion (`encode_images`), the LLM's embedding of the text, the image
tokens spliced in at the prompt position, the LLM with labels (its own shifted
cross-entropy over the logits), and the CPM's real/fake logit pair at a fixed
position. The model's index checks on real values (exactly one image
placeholder per row, the CPM position found in the labels) need data and cannot
run on fake tensors; the splice and the CPM are therefore done here with the
same shapes, on a batch without padding (every sample at full length: the
memory bound).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modeling.config import ModelConfig
from modeling.llm import causal_lm
from modeling.vision import torch_dtype


@dataclass(frozen=True)
class FakeStepPeak:
    """Peak bytes of one fake training micro-step, by MemTracker's categories."""

    total: int
    """Everything live at the peak."""
    by_category: dict
    """MemTracker's categories at the peak (Parameter, Gradient, Activation, Temp, ...)."""
    baseline: int
    """Bytes live before the step (parameters and buffers)."""

    @property
    def step(self) -> int:
        """What the micro-step adds to the model's weights at its peak: activations,
        temporaries, the trainable parameters' gradients and the inputs."""
        return self.total - self.baseline


def _frozen_aware_tracker():
    from torch.distributed._tools.mem_tracker import MemTracker

    class FrozenAwareMemTracker(MemTracker):
        """MemTracker registers a gradient hook on every parameter of each module it
        enters, which torch refuses for a frozen one (the towers, the LLM under LoRA);
        hooks go only on modules whose parameters all train (so every trainable
        gradient is still categorised: LoRA A/B, projectors and fusion are such modules)."""

        def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
            trainable = all(p.requires_grad for p in module.parameters())
            return super()._track_module_params_and_buffers(module, install_grad_hooks and trainable)

    return FrozenAwareMemTracker()


def fake_model(cfg: ModelConfig, fake_mode, gradient_checkpointing: bool, tokenizer=None):
    """The model with fake parameters (and buffers) in cfg.dtype, as DeepSpeed's
    bf16 mode holds every parameter (the LoRA adapters included). Without a
    tokenizer the embeddings have cfg.llm.vocab_size rows."""
    from modeling.model import FakeReasoningModel

    dtype = torch_dtype(cfg.dtype)
    with torch.device("meta"):
        model = FakeReasoningModel(cfg, tokenizer)
    with fake_mode:
        for m in model.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=dtype),
                                                       requires_grad=p.requires_grad)
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = torch.zeros(b.shape, dtype=dtype if b.is_floating_point() else b.dtype)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    # As under ZeRO-3, a trainable parameter's full-size gradient does not stay on
    # the device once computed (it is reduced into its partition in buckets, which
    # the model-states lines of the plan count): drop it, so the peak is the step's.
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_drop_grad)
    model.train()
    return model


def _drop_grad(param: nn.Parameter) -> None:
    param.grad = None


def _step(model, cfg: ModelConfig, micro_batch: int, positions: int) -> torch.Tensor:
    """One micro-step's loss (see the module docstring); runs inside the fake mode."""
    n = cfg.num_image_tokens
    text = positions - n + 1  # the text tokens, the image placeholder among them
    pixels = torch.zeros(micro_batch, 3, cfg.image_size, cfg.image_size, dtype=torch.float32)
    ids = torch.zeros(micro_batch, text, dtype=torch.long)
    lm = causal_lm(model.llm)
    features = model.encode_images(pixels)
    text_embeds = lm.get_input_embeddings()(ids)
    at = 40 if text > 80 else text // 2  # the placeholder's position: after the system prompt
    # The placeholder's row replaced by the image tokens, as merge_image_features does.
    embeds = torch.cat([text_embeds[:, :at], features.to(text_embeds.dtype), text_embeds[:, at + 1:]], dim=1)
    labels = torch.zeros(micro_batch, positions, dtype=torch.long)
    out = lm(inputs_embeds=embeds, labels=labels, use_cache=False)
    # The CPM: the real/fake pair of logits at one position per sample, tempered softmax, cross-entropy.
    pair = out.logits[:, positions - 4, :2].float() / model.config.cpm.temperature
    cpm = nn.functional.cross_entropy(pair, torch.zeros(micro_batch, dtype=torch.long))
    return out.loss + model.config.cpm.weight * cpm


def measure(cfg: ModelConfig, micro_batch: int, positions: int, gradient_checkpointing: bool,
            tokenizer=None) -> FakeStepPeak:
    """Peak memory of forward + backward of one micro-batch of `micro_batch`
    samples, each `positions` LLM positions long (image tokens included)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if positions <= cfg.num_image_tokens:
        raise ValueError(f"positions={positions} must exceed the {cfg.num_image_tokens} image tokens")
    # Non-fake inputs are the meta parameters replaced in fake_model, nothing else.
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = fake_model(cfg, mode, gradient_checkpointing, tokenizer)
    tracker = _frozen_aware_tracker()
    with mode:
        tracker.track_external(model)
        baseline = sum(v["Total"] for v in tracker.get_tracker_snapshot("current").values())
        with tracker:
            loss = _step(model, cfg, micro_batch, positions)
            loss.backward()
        peak = tracker.get_tracker_snapshot("peak")
    total = sum(v["Total"] for v in peak.values())
    cats = {getattr(k, "value", str(k)): int(v) for dev in peak.values() for k, v in dev.items() if k != "Total"}
    return FakeStepPeak(total=int(total), by_category=cats, baseline=int(baseline))
