"""`fakereasoning-train --check --plan`: the paper recipe planned on the meta
device, each figure from its formula, the verdicts, the advice and the JSON."""
from __future__ import annotations

import json

import pytest

from common.config_loading import ConfigError
from modeling.costs.flops import step_flops
from modeling.costs.memory import activation_terms
from pipeline.distributed.zero_memory import model_state_lines
from pipeline.training.cli import main
from pipeline.training.config import load_train_config
from pipeline.training.plan import FRAGMENTATION, GIB, GPUS, PlanInputs, make_plan, planned_model_config

PAPER = "fakereasoning-13b"


@pytest.fixture(scope="module")
def paper():
    return load_train_config(PAPER)


def test_paper_on_8_a800_fits_and_every_line_is_its_formula(paper, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["--config", PAPER, "--check", "--plan", "--gpus", "8", "--gpu", "a800-40gb",
                 "--plan-json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("plan: fakereasoning-13b on 1 node(s) x 8 A800-40GB (8 GPUs, 39.4 GiB each)")
    assert "batch: global 128 = micro-batch 8 x accumulation 2 x 8 GPUs (loop.global_batch)" in text
    assert "verdict: FITS; largest micro-batch that fits: data.batch_size=8 with accumulation 2" in text
    assert "3 epochs of 100,000 samples on 8 A800-40GB at 40% MFU: about" in text
    assert "note: inputs not ready for a run" in text  # /data/mmfr-shards is not here; the plan does not need it
    plan = json.loads(out.read_text())
    total = plan["params"]["components"]["total"]
    assert total["trainable"] + total["frozen"] == total["total"]
    assert plan["params"]["components"]["lora"]["trainable"] == 40 * 128 * (4 * 2 * 5120 + 3 * (5120 + 13824))
    lines = {x["name"]: x["bytes"] for x in plan["memory_lines"]}
    states = model_state_lines(total["trainable"], total["frozen"], plan["params"]["largest_layer"], 8)
    assert all(lines[x.name] == x.bytes for x in states)
    model_cfg = planned_model_config(paper)
    terms = activation_terms(model_cfg, 8, 2623, True)
    assert lines["logits"] == 14 * 32000 * 2623 * 8 == sum(t.bytes for t in terms if t.name == "logits")
    assert lines["activations"] == int(sum(t.bytes for t in terms if t.name != "logits"))
    subtotal = sum(lines.values())
    assert plan["total_bytes"] == int(subtotal * (1 + FRAGMENTATION)) <= plan["usable_bytes"]
    assert plan["usable_bytes"] == int((39.4 - 1.0) * GIB)
    # Time: model FLOPs of 128 samples at the longest length, over 8 GPUs at 40% of 312 TFLOP/s.
    t = plan["time"]
    flops = step_flops(model_cfg, 32000).for_lengths([2623] * 128)
    assert t["model_flops_per_step"] == flops
    assert t["step_s"] == pytest.approx(flops / (8 * 312e12 * 0.4))
    assert t["steps"] == 3 * 100_000 // 128 and t["total_h"] == pytest.approx(t["steps"] * t["step_s"] / 3600)


def test_two_24gb_gpus_need_the_optimizer_offloaded(paper):
    plan = make_plan(paper, PlanInputs(gpus_per_node=2, gpu="a10-24gb"))
    assert plan.verdict == "does not fit"
    assert plan.advice.startswith("fits with zero.offload_optimizer=cpu; largest micro-batch that fits: "
                                  "data.batch_size=")
    # The advised setting really fits: planned again with it.
    mb = int(plan.advice.split("data.batch_size=")[1].split()[0])
    advised = load_train_config(PAPER, ["zero.offload_optimizer=cpu", f"data.batch_size={mb}"])
    again = make_plan(advised, PlanInputs(gpus_per_node=2, gpu="a10-24gb"))
    assert again.verdict == "fits" and again.batch["grad_accum"] == 128 // (2 * mb)


def test_without_checkpointing_the_plan_says_to_turn_it_on(paper):
    cfg = load_train_config(PAPER, ["loop.gradient_checkpointing=false"])
    plan = make_plan(cfg, PlanInputs(gpus_per_node=8, gpu="a800-40gb"))
    assert plan.verdict == "does not fit"
    assert plan.advice.startswith("fits with loop.gradient_checkpointing=true; largest micro-batch")
    # 80 GB hold a smaller micro-batch without it: the same settings come first.
    plan = make_plan(cfg, PlanInputs(gpus_per_node=8, gpu="h100-80gb"))
    assert plan.advice == "largest micro-batch that fits: data.batch_size=2 with accumulation 8 (global batch 128)"


def test_plan_errors(capsys):
    assert main(["--config", PAPER, "--check", "--plan", "--gpus", "6"]) == 2
    err = capsys.readouterr().err
    assert "loop.global_batch=128 is not a multiple of data.batch_size=8 x 6 rank(s) = 48" in err
    assert "loop.global_batch=96 or 144" in err
    with pytest.raises(SystemExit):
        main(["--config", PAPER, "--check", "--plan", "--gpu", "h100"])
    assert "argument --gpu: invalid choice: 'h100'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--gpu h100: unknown; one of " + ", ".join(GPUS)):
        make_plan(load_train_config(PAPER), PlanInputs(gpu="h100"))
    with pytest.raises(SystemExit):
        main(["--config", PAPER, "--plan"])
    assert "--plan goes with --check" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", PAPER, "--check", "--plan", "--mfu", "1.5"])


def test_verdicts_around_the_margin():
    from pipeline.training.plan import _verdict

    assert _verdict(90, 99, 100) == "fits"
    assert _verdict(95, 104, 100) == "tight"  # the lines fit, the fragmentation margin does not
    assert _verdict(101, 111, 100) == "does not fit"


def test_the_llms_shape_and_vocabulary_come_from_its_folder(tmp_path):
    """model.llm.path set: its config.json gives the vocabulary (no weights read) and
    must agree with the llm.* fields, as at the run's start."""
    from safetensors.torch import save_file
    import torch

    from modeling.config import ModelConfig

    llm = ModelConfig.preset("tiny").llm
    folder = tmp_path / "base"
    folder.mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": llm.hidden_size,
              "intermediate_size": llm.intermediate_size, "num_hidden_layers": llm.num_layers,
              "num_attention_heads": llm.num_heads, "num_key_value_heads": llm.num_kv_heads, "vocab_size": 777,
              "rms_norm_eps": llm.rms_norm_eps, "max_position_embeddings": llm.max_position_embeddings}
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"model.embed_tokens.weight": torch.zeros(777, llm.hidden_size)}, str(folder / "model.safetensors"))
    cfg = load_train_config("tiny-cpu", [f"model.llm.path={folder}"])
    plan = make_plan(cfg, PlanInputs(gpus_per_node=2, gpu="l4-24gb"))
    assert planned_model_config(cfg).llm.vocab_size == 777 and planned_model_config(cfg).llm.path is None
    assert "vocabulary 777" in {x["name"]: x["formula"] for x in plan.memory_lines}["logits"]
    config["hidden_size"] = 2 * llm.hidden_size
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=rf"llm.hidden_size={llm.hidden_size} but the model has"):
        make_plan(cfg, PlanInputs())
    with pytest.raises(ConfigError, match=r"llm.path=.*config.json: not a directory"):
        make_plan(load_train_config("tiny-cpu", [f"model.llm.path={folder / 'config.json'}"]), PlanInputs())
