"""The plan's ZeRO model states equal DeepSpeed's own estimators (read from the
installed deepspeed), and its largest layer is DeepSpeed's."""
from __future__ import annotations

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from pipeline.distributed.zero_memory import model_state_lines, zero3_buffer_lines

# The paper model's counts (fakereasoning-13b: LoRA r=128, projectors, fusion; towers and LLM frozen).
TRAINABLE, FROZEN, LARGEST = 878_270_512, 13_622_928_384, 163_840_000


def _sum(lines) -> int:
    return sum(x.bytes for x in lines)


@pytest.mark.parametrize("gpus, nodes", [(1, 1), (8, 1), (8, 2), (2, 1)])
@pytest.mark.parametrize("offload_optimizer, offload_param", [(False, False), (True, False), (True, True)])
def test_stage3_equals_deepspeeds_estimator(gpus, nodes, offload_optimizer, offload_param):
    world = gpus * nodes
    _, ds_gpu, largest_memory = estimate_zero3_model_states_mem_needs(
        TRAINABLE + FROZEN, LARGEST, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload_optimizer,
        cpu_offload_params=offload_param)
    # Everything trained: DeepSpeed's case, to the byte.
    everything = model_state_lines(TRAINABLE + FROZEN, 0, LARGEST, world, 3, offload_optimizer, offload_param)
    assert _sum(everything) == ds_gpu
    assert everything[2].bytes == largest_memory
    # Frozen parameters hold only their bf16 partition (none when the parameters are offloaded).
    _, ds_trainable, _ = estimate_zero3_model_states_mem_needs(
        TRAINABLE, LARGEST, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload_optimizer,
        cpu_offload_params=offload_param)
    lora = model_state_lines(TRAINABLE, FROZEN, LARGEST, world, 3, offload_optimizer, offload_param)
    assert _sum(lora) == ds_trainable + (0 if offload_param else int(2 * FROZEN / world))
    assert "18 B x 878 M trainable / " in model_state_lines(TRAINABLE, FROZEN, LARGEST, world)[0].formula


@pytest.mark.parametrize("offload_optimizer", [False, True])
def test_stage2_equals_deepspeeds_estimator(offload_optimizer):
    _, ds_gpu = estimate_zero2_model_states_mem_needs(TRAINABLE + FROZEN, num_gpus_per_node=8,
                                                      cpu_offload=offload_optimizer)
    assert _sum(model_state_lines(TRAINABLE + FROZEN, 0, LARGEST, 8, 2, offload_optimizer)) == ds_gpu


def test_largest_layer_is_deepspeeds():
    from modeling.config import ModelConfig
    from pipeline.training.plan import count_parameters

    cfg = ModelConfig.preset("tiny")
    cfg.llm.vocab_size = 500
    counts = count_parameters(cfg, persistence_threshold=100_000)
    from modeling.costs.summary import build_meta

    assert counts["largest_layer"] == model_to_params(build_meta(cfg))[1]
    assert counts["components"]["total"]["total"] == sum(p.numel() for p in build_meta(cfg).parameters())


def test_stage3_buffers_come_from_the_deepspeed_json():
    lines = {x.name: x for x in zero3_buffer_lines({"stage3_prefetch_bucket_size": 10, "reduce_bucket_size": 20,
                                                    "stage3_max_live_parameters": 300}, 7, 1000)}
    assert lines["ZeRO-3 live parameters (a block gathered)"].bytes == 600  # capped by max live parameters
    assert lines["ZeRO-3 prefetch bucket"].bytes == 20 and lines["gradient reduce bucket"].bytes == 40
    assert lines["persistent parameters (whole)"].bytes == 14
