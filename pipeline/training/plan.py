"""`fakereasoning-train --config RECIPE --check --plan`: memory and time of a run
on a cluster, before queueing for it.

Without a GPU and without weights: the model is built on the meta device from
the recipe's model section (the LLM's shape and vocabulary from its folder's
config.json when model.llm.path is set, from the preset otherwise), its
parameters counted per component, and the per-GPU memory added up line by line:
ZeRO model states and buffers (pipeline/distributed/zero_memory.py, DeepSpeed's
own estimator), activations of one micro-batch of the longest sequences the
loader can make (modeling/costs/memory.py, checked against a FakeTensorMode step),
and a fragmentation margin. The verdict names the largest micro-batch that
fits with the accumulation that keeps the global batch, or the offload that
makes it fit. The time is modeling.costs.flops' model FLOPs per optimizer step at an
assumed MFU of the GPU's dense bf16 peak.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field

from common.config_loading import ConfigError
from modeling.costs.flops import PEAK_TFLOPS, step_flops
from modeling.costs.memory import activation_terms, recompute_bytes, tower_forward_bytes
from pipeline.distributed.zero_memory import MemLine, model_state_lines, zero3_buffer_lines
from pipeline.training.batch import BatchPlan, plan_for
from pipeline.training.config import TrainConfig

GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    """A GPU model the plan knows."""

    memory_gib: float
    """Memory as torch.cuda.get_device_properties(d).total_memory reports it, in GiB."""
    peak_tflops: float
    """Dense bf16 (fp16 where there is no bf16) tensor-core peak, TFLOP/s."""
    label: str
    """How the plan prints it."""


GPUS: dict[str, Gpu] = {
    "h200-141gb": Gpu(139.8, PEAK_TFLOPS["H200"], "H200-141GB"),
    "h100-80gb": Gpu(79.2, PEAK_TFLOPS["H100"], "H100-80GB"),
    "h800-80gb": Gpu(79.2, PEAK_TFLOPS["H800"], "H800-80GB"),
    "a100-80gb": Gpu(79.2, PEAK_TFLOPS["A100"], "A100-80GB"),
    "a800-80gb": Gpu(79.2, PEAK_TFLOPS["A800"], "A800-80GB"),
    "a100-40gb": Gpu(39.4, PEAK_TFLOPS["A100"], "A100-40GB"),
    "a800-40gb": Gpu(39.4, PEAK_TFLOPS["A800"], "A800-40GB"),
    "l40s-48gb": Gpu(44.4, PEAK_TFLOPS["L40S"], "L40S-48GB"),
    "a6000-48gb": Gpu(47.5, PEAK_TFLOPS["A6000"], "RTX A6000-48GB"),
    "v100-32gb": Gpu(31.7, PEAK_TFLOPS["V100"], "V100-32GB"),
    "a10-24gb": Gpu(22.1, PEAK_TFLOPS["A10"], "A10-24GB"),
    "l4-24gb": Gpu(22.0, PEAK_TFLOPS["L4"], "L4-24GB"),
    "rtx4090-24gb": Gpu(23.6, 165.2, "RTX 4090-24GB"),  # 165.2 dense bf16 with fp32 accumulation
    "rtx3090-24gb": Gpu(23.6, 71.0, "RTX 3090-24GB"),    # 71 dense bf16 with fp32 accumulation
}
RESERVED_GIB = 1.0
"""Per GPU, not available to the training: the CUDA context and NCCL's buffers."""
FRAGMENTATION = 0.10
"""Margin on the sum of the lines for the caching allocator's fragmentation."""
MMFR_TRAIN_SAMPLES = 100_000
"""MMFR's training images as released (50K fakes, 50K reals): the sample count
when the recipe's shards are not there to count."""


@dataclass
class PlanInputs:
    """What the plan is asked about (the command line's --gpus, --nodes, --gpu, --mfu)."""

    gpus_per_node: int = 8
    nodes: int = 1
    gpu: str = "h100-80gb"
    mfu: float = 0.4
    samples: int | None = None
    """Training samples per epoch; None: the shard set's count, else MMFR's 100,000."""
    positions: int | None = None
    """LLM positions per sample for the time; None: the longest (the memory bound)."""


@dataclass
class Plan:
    """The plan's figures (what --plan-json writes)."""

    inputs: dict
    params: dict
    batch: dict
    positions: int
    memory_lines: list[dict]
    activations: dict
    total_bytes: int
    usable_bytes: int
    verdict: str
    advice: str
    time: dict
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- the model's counts

def planned_model_config(cfg: TrainConfig):
    """The model section the plan builds: the LLM's shape and vocabulary from its
    folder's config.json when model.llm.path is set (checked against the llm.*
    fields as a run would), every path cleared so that nothing is read."""
    from modeling.llm import _check_shape_fields

    m = copy.deepcopy(cfg.model)
    if m.llm.path:
        from modeling.checkpoints.base import inspect_base

        try:
            config = inspect_base(m.llm.path).llm_config()
            if config is None:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(m.llm.path)
        except (OSError, ValueError) as e:  # CheckpointError is a ValueError
            text = str(e)
            raise ConfigError(text if text.startswith("llm.path=") else f"model.llm.path={m.llm.path}: {text}") \
                from None
        _check_shape_fields(m.llm, config)
        m.llm.vocab_size = int(config.vocab_size)
    if not m.llm.vocab_size:
        raise ConfigError("model.llm.vocab_size is null and model.llm.path is unset: the plan cannot size the "
                          "embeddings; set model.llm.vocab_size (the tokenizer's length)")
    m.llm.path = m.clip.path = m.dino.path = None
    return m


def count_parameters(model_cfg, persistence_threshold: int) -> dict:
    """Counts of the meta-device model: per component (modeling.costs.summary), the
    largest module's own parameters (DeepSpeed's "largest layer"), the largest
    block of a stack (a decoder layer) and the
    parameters in tensors below the ZeRO-3 persistence threshold."""
    import torch

    from modeling.costs.summary import build_meta, summarize

    model = build_meta(model_cfg)
    components = {k: {"total": v["total"], "trainable": v["trainable"], "frozen": v["frozen"]}
                  for k, v in summarize(model).items()}
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    # The largest block of a stack (a decoder layer): what ZeRO-3 gathers while it runs.
    block = max((sum(p.numel() for p in item.parameters()) for m in model.modules()
                 if isinstance(m, torch.nn.ModuleList) for item in m), default=largest)
    persistent = sum(p.numel() for p in model.parameters() if p.numel() < persistence_threshold)
    return {"components": components, "largest_layer": int(largest), "largest_block": int(block),
            "persistent": int(persistent)}


# --------------------------------------------------------------------------- memory

def _memory(cfg: TrainConfig, model_cfg, params: dict, batch: BatchPlan, positions: int,
            offload_optimizer: bool, offload_param: bool, ckpt: bool) -> tuple[list[MemLine], dict]:
    from pipeline.distributed.ds_config import build_deepspeed_config

    total = params["components"]["total"]
    zero = build_deepspeed_config(cfg, batch.world_size)["zero_optimization"]
    lines = model_state_lines(total["trainable"], total["frozen"], params["largest_layer"], batch.world_size,
                              cfg.zero.stage, offload_optimizer, offload_param)
    if cfg.zero.stage == 3:
        lines += zero3_buffer_lines(zero, params["persistent"], params["largest_block"])
    b = batch.micro_batch
    terms = activation_terms(model_cfg, b, positions, ckpt)
    logits = sum(t.bytes for t in terms if t.name == "logits")
    rest = sum(t.bytes for t in terms if t.name != "logits")
    # With checkpointing one layer's activations come back in its backward, after the logits are gone.
    recompute = recompute_bytes(model_cfg, b, positions) if ckpt else 0.0
    towers = tower_forward_bytes(model_cfg, b)
    logits_phase = rest + logits
    recompute_phase = rest + recompute
    peak = max(logits_phase, recompute_phase, towers)
    where = ("the recomputed layer's backward" if peak == recompute_phase and recompute_phase > logits_phase
             else "the frozen towers' forward" if peak == towers and towers > logits_phase
             else "the start of the backward")
    lines.append(MemLine("activations", int(peak - logits if peak == logits_phase else peak),
                         f"peak at {where}; terms below (modeling/costs/memory.py)"))
    lines.append(MemLine("logits", int(logits) if peak == logits_phase else 0,
                         f"14 B x vocabulary {model_cfg.llm.vocab_size} x {positions} positions x micro-batch {b}"))
    info = {"micro_batch": b, "gradient_checkpointing": ckpt, "logits_phase": logits_phase,
            "recompute_phase": recompute_phase, "tower_forward": towers,
            "terms": [{"name": t.name, "bytes": t.bytes, "formula": t.formula} for t in terms]}
    return lines, info


def _required(lines: list[MemLine]) -> tuple[int, int]:
    subtotal = sum(x.bytes for x in lines)
    return subtotal, int(subtotal * (1 + FRAGMENTATION))


def _verdict(subtotal: int, total: int, usable: int) -> str:
    if total <= usable:
        return "fits"
    if subtotal <= usable:
        return "tight"
    return "does not fit"


def _micro_batches(batch: BatchPlan, global_batch: int) -> list[int]:
    """Micro-batches that keep the global batch on this world size (largest first)."""
    per_rank = global_batch // batch.world_size
    return sorted((m for m in range(1, per_rank + 1) if per_rank % m == 0), reverse=True)


# --------------------------------------------------------------------------- the plan

def training_samples(cfg: TrainConfig, asked: int | None) -> tuple[int, str]:
    if asked is not None:
        return asked, "--samples"
    from pipeline.data.shards import discover_shards

    try:
        shards = discover_shards(cfg.data.train_shards, cfg.data.sizes_file)
        return sum(shards.counts), f"the shard set {cfg.data.train_shards}"
    except (OSError, ValueError):
        return MMFR_TRAIN_SAMPLES, "MMFR's release (data.train_shards not readable here; --samples to change)"


def make_plan(cfg: TrainConfig, inputs: PlanInputs) -> Plan:
    """The plan of `cfg` on inputs.nodes x inputs.gpus_per_node GPUs of kind inputs.gpu."""
    if inputs.gpu not in GPUS:
        raise ConfigError(f"--gpu {inputs.gpu}: unknown; one of {', '.join(GPUS)}")
    gpu = GPUS[inputs.gpu]
    world = inputs.gpus_per_node * inputs.nodes
    batch = plan_for(cfg, world)
    model_cfg = planned_model_config(cfg)
    params = count_parameters(model_cfg, cfg.zero.stage3_param_persistence_threshold)
    positions = cfg.data.max_length - 1 + model_cfg.num_image_tokens
    usable = int((gpu.memory_gib - RESERVED_GIB) * GIB)
    z = cfg.zero
    ckpt = cfg.loop.gradient_checkpointing

    def assess(mb: int, off_opt: bool, off_par: bool, ck: bool):
        bp = BatchPlan(mb, batch.global_batch // (mb * world), world, batch.source)
        lines, info = _memory(cfg, model_cfg, params, bp, positions, off_opt, off_par, ck)
        subtotal, total = _required(lines)
        return lines, info, subtotal, total, _verdict(subtotal, total, usable)

    lines, info, subtotal, total, verdict = assess(batch.micro_batch, z.offload_optimizer == "cpu",
                                                   z.offload_param == "cpu", ckpt)
    other_ckpt = _memory(cfg, model_cfg, params, batch, positions, z.offload_optimizer == "cpu",
                         z.offload_param == "cpu", not ckpt)[1]
    advice = _advice(batch, assess, z, ckpt, verdict)
    time = _time(cfg, model_cfg, batch, gpu, inputs)
    acts = {"with_gradient_checkpointing" if ckpt else "without_gradient_checkpointing": info,
            "without_gradient_checkpointing" if ckpt else "with_gradient_checkpointing": other_ckpt}
    return Plan(inputs=dict(asdict(inputs), world_size=world, gpu_label=gpu.label, gpu_memory_gib=gpu.memory_gib,
                            gradient_checkpointing=ckpt, zero_stage=z.stage, offload_optimizer=z.offload_optimizer,
                            offload_param=z.offload_param, attn_implementation=model_cfg.llm.attn_implementation),
                params=params, batch=batch.record(), positions=positions,
                memory_lines=[asdict(x) for x in lines], activations=acts, total_bytes=total,
                usable_bytes=usable, verdict=verdict, advice=advice, time=time)


def _advice(batch: BatchPlan, assess, z, ckpt: bool, verdict: str) -> str:
    """The largest micro-batch that fits with the accumulation that keeps the global
    batch; when none does, the first of: checkpointing, optimizer offload, both offloads."""
    g = batch.global_batch
    settings = [((z.offload_optimizer == "cpu", z.offload_param == "cpu", ckpt), "")]
    if not ckpt:
        settings.append(((z.offload_optimizer == "cpu", z.offload_param == "cpu", True),
                         "loop.gradient_checkpointing=true"))
    settings += [((True, z.offload_param == "cpu", True), "zero.offload_optimizer=cpu"),
                 ((True, True, True), "zero.offload_optimizer=cpu zero.offload_param=cpu")]
    seen = set()
    for (off_opt, off_par, ck), change in settings:
        if (off_opt, off_par, ck) in seen:
            continue
        seen.add((off_opt, off_par, ck))
        for mb in _micro_batches(batch, g):
            if assess(mb, off_opt, off_par, ck)[4] == "fits":
                acc = g // (mb * batch.world_size)
                what = f"largest micro-batch that fits: data.batch_size={mb} with accumulation {acc} (global batch {g})"
                if not change:
                    return what
                if ck and not ckpt and "gradient_checkpointing" not in change:
                    change = "loop.gradient_checkpointing=true " + change
                return f"fits with {change}; {what}"
    return (f"does not fit even with micro-batch 1, gradient checkpointing and both offloads on "
            f"{batch.world_size} GPU(s): use more GPUs or GPUs with more memory")


def _time(cfg: TrainConfig, model_cfg, batch: BatchPlan, gpu: Gpu, inputs: PlanInputs) -> dict:
    samples, source = training_samples(cfg, inputs.samples)
    positions = inputs.positions or (cfg.data.max_length - 1 + model_cfg.num_image_tokens)
    g = batch.global_batch
    flops = step_flops(model_cfg, vocab_size=model_cfg.llm.vocab_size).for_lengths([positions] * g)
    step_s = flops / (batch.world_size * gpu.peak_tflops * 1e12 * inputs.mfu)
    steps_per_epoch = max(1, samples // g)
    if cfg.loop.max_steps is not None:
        steps, length = cfg.loop.max_steps, f"{cfg.loop.max_steps} optimizer steps"
    else:
        steps = max(1, math.floor(cfg.loop.epochs * samples / g))
        length = f"{cfg.loop.epochs:g} epochs of {samples:,} samples"
    return {"samples": samples, "samples_source": source, "positions": positions,
            "positions_source": "--positions" if inputs.positions else "the longest (data.max_length - 1 + image tokens): an upper bound",
            "model_flops_per_step": flops, "peak_tflops": gpu.peak_tflops, "mfu": inputs.mfu,
            "step_s": step_s, "steps_per_epoch": steps_per_epoch, "epoch_h": steps_per_epoch * step_s / 3600,
            "steps": steps, "total_h": steps * step_s / 3600, "length": length}


# --------------------------------------------------------------------------- output

def _gib(x: float) -> str:
    return f"{x / GIB:6.2f} GiB"


def format_plan(plan: Plan, recipe: str) -> str:
    """The plan as the command prints it."""
    i, b, t = plan.inputs, plan.batch, plan.time
    c = plan.params["components"]
    out = [f"plan: {recipe} on {i['nodes']} node(s) x {i['gpus_per_node']} {i['gpu_label']} "
           f"({i['world_size']} GPUs, {i['gpu_memory_gib']:g} GiB each)",
           f"batch: global {b['global_batch']} = micro-batch {b['micro_batch']} x accumulation {b['grad_accum']} "
           f"x {b['world_size']} GPUs ({b['grad_accum_from']}); {plan.positions} positions per sample at most",
           "parameters: " + ", ".join(f"{k} {v['total'] / 1e6:,.1f} M" for k, v in c.items()
                                      if k != "total" and v["total"]),
           f"  total {c['total']['total'] / 1e9:.3f} B: trainable {c['total']['trainable'] / 1e6:,.1f} M, "
           f"frozen {c['total']['frozen'] / 1e9:.3f} B; largest module {plan.params['largest_layer'] / 1e6:,.1f} M",
           "memory per GPU:"]
    ckpt_key = "with_gradient_checkpointing" if plan.inputs["gradient_checkpointing"] else \
        "without_gradient_checkpointing"
    for line in plan.memory_lines:
        out.append(f"  {line['name']:<48} {_gib(line['bytes'])}  {line['formula']}")
        if line["name"] == "activations":
            for term in plan.activations[ckpt_key]["terms"]:
                if term["name"] != "logits":
                    out.append(f"    {term['name']:<46} {_gib(term['bytes'])}  {term['formula']}")
    subtotal = sum(x["bytes"] for x in plan.memory_lines)
    out.append(f"  {'fragmentation margin':<48} {_gib(plan.total_bytes - subtotal)}  "
               f"{FRAGMENTATION:.0%} of {subtotal / GIB:.2f} GiB")
    out.append(f"  {'total':<48} {_gib(plan.total_bytes)}  of {plan.usable_bytes / GIB:.2f} GiB usable "
               f"({i['gpu_memory_gib']:g} - {RESERVED_GIB:g} GiB CUDA context and NCCL)")
    for key, label in (("with_gradient_checkpointing", "with"), ("without_gradient_checkpointing", "without")):
        a = plan.activations[key]
        out.append(f"  activations + logits {label} gradient checkpointing: "
                   f"{max(a['logits_phase'], a['recompute_phase'], a['tower_forward']) / GIB:.2f} GiB "
                   f"(micro-batch {a['micro_batch']}; frozen towers' forward {a['tower_forward'] / GIB:.2f} GiB, "
                   f"transient)")
    out.append(f"verdict: {plan.verdict.upper()}; {plan.advice}")
    out.append(f"time: {t['model_flops_per_step']:.3g} model FLOPs per optimizer step ({t['positions']} positions "
               f"per sample, {t['positions_source']}); {t['step_s']:.1f} s per step at {t['mfu']:.0%} MFU of "
               f"{t['peak_tflops']:g} TFLOP/s")
    out.append(f"  {t['length']} on {i['world_size']} {i['gpu_label']} at {t['mfu']:.0%} MFU: about "
               f"{t['total_h']:.1f} h ({t['steps']:,} steps; {t['epoch_h']:.1f} h per epoch; samples from "
               f"{t['samples_source']})")
    out += [f"note: {n}" for n in plan.notes]
    return "\n".join(out)


def write_plan_json(plan: Plan, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(asdict(plan), f, indent=1)
