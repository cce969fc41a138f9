"""Checkpoint round trips: trainable state, merged export, and the reference's formats."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling.checkpoints.checkpoint import (
    CheckpointError,
    checkpoint_format,
    checkpoint_parameters,
    export_merged,
    import_reference,
    load_for_inference,
    load_pretrained,
    load_trainable,
    save_trainable,
)
from modeling.config import ModelConfig
from modeling.model import FakeReasoningModel
from modeling.template import build_training_example
from modeling.tokenization.tokenizer import build_bpe_tokenizer, demo_corpus
from sharding import schema

# Reference names (the list) for our fusion submodules, spelled here on
# purpose rather than taken from modeling.fusion, so the mapping is checked.
REF_FUSION = {
    "bias_net.0": "attention_mlp.mlp.0",
    "bias_net.2": "attention_mlp.mlp.2",
    "q_proj": "mhatt.0.linear_q",
    "k_proj": "mhatt.0.linear_k",
    "v_proj": "mhatt.0.linear_v",
    "out_proj": "mhatt.0.linear_merge",
    "ffn_up": "ffn.0.mlp.fc.linear",
    "ffn_down": "ffn.0.mlp.linear",
    "attn_norm": "norm.0",
    "ffn_norm": "norm.1",
}


def to_reference(clean: str) -> str | None:
    if clean.startswith(("clip_tower.", "dino_tower.")):
        return None  # the reference loads its towers from their own paths
    if clean.startswith("llm."):
        return clean[4:]
    if clean.startswith("clip_projector."):
        return "model.mm_projector." + clean[len("clip_projector."):]
    if clean.startswith("dino_projector."):
        return "model.dino_mm_projector." + clean[len("dino_projector."):]
    module, _, param = clean[len("fusion."):].rpartition(".")
    if module.endswith("norm"):
        param = {"weight": "a_2", "bias": "b_2"}[param]
    return f"model.crossattention.{REF_FUSION[module]}.{param}"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny 'trained' model (every weight, LoRA B included, perturbed) with its towers saved to paths."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ckpt")
    tok = build_bpe_tokenizer(demo_corpus(schema.ATTRIBUTES, [schema.EVAL_QUESTION]), root / "tok", vocab_size=600)
    torch.manual_seed(0)
    model = FakeReasoningModel(ModelConfig.preset("tiny"), tok)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    model.clip_tower.model.save_pretrained(root / "clip")
    model.dino_tower.model.save_pretrained(root / "dino")
    with_paths = ModelConfig.from_dict({"clip": {"path": str(root / "clip")}, "dino": {"path": str(root / "dino")}},
                                       base=ModelConfig.preset("tiny"))
    ex = build_training_example(tok, schema.EVAL_QUESTION, "<REASONING>x</REASONING>\n<CONCLUSION>This image is fake.</CONCLUSION>")
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(1, 3, 56, 56, generator=g), torch.tensor([ex.input_ids]),
             torch.ones(1, len(ex.input_ids), dtype=torch.long), torch.tensor([ex.labels]), torch.tensor([1]))
    return {"root": root, "tok": tok, "model": model, "with_paths": with_paths, "batch": batch,
            "logits": logits(model, batch)}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(*batch, return_logits=True).logits


def fresh(cfg, tok, seed=123):
    torch.manual_seed(seed)
    return FakeReasoningModel(cfg, tok).eval()


# ---------------------------------------------------------------------- trainable state
def test_trainable_round_trip_is_exact(env, tmp_path):
    model, tok = env["model"], env["tok"]
    save_trainable(model, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"model_config.json", "adapter_config.json", "adapter_model.safetensors",
            "non_lora_trainables.safetensors", "base_weights.safetensors", "tokenizer.json"} <= names
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (8, 16)
    lora_keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in lora_keys
    assert all(".lora_" in k for k in lora_keys)
    non_lora = load_file(tmp_path / "non_lora_trainables.safetensors").keys()
    assert {k.split(".")[0] for k in non_lora} == {"clip_projector", "dino_projector", "fusion"}

    other = fresh(model.config, tok)
    assert not torch.equal(logits(other, env["batch"]), env["logits"])  # the load must do the work
    load_trainable(other, tmp_path)
    assert torch.equal(logits(other, env["batch"]), env["logits"])
    reloaded, _ = load_for_inference(tmp_path)
    assert torch.equal(logits(reloaded, env["batch"]), env["logits"])


def test_trainable_checkpoint_leaves_path_components_to_their_paths(env, tmp_path):
    model = fresh(env["with_paths"], env["tok"])
    # What a ZeRO-3 run must gather: everything but the towers that have paths.
    gathered = {id(p) for p in checkpoint_parameters(model)}
    names = {n for n, p in model.named_parameters() if id(p) in gathered}
    assert names == {n for n, _ in model.named_parameters() if not n.startswith(("clip_tower.", "dino_tower."))}
    assert len(checkpoint_parameters(env["model"])) == len(list(env["model"].parameters()))
    save_trainable(model, tmp_path)
    base = load_file(tmp_path / "base_weights.safetensors").keys()
    assert base and all(k.startswith("llm.") for k in base)  # towers come from clip.path / dino.path
    reloaded, _ = load_for_inference(tmp_path)
    assert torch.equal(logits(reloaded, env["batch"]), logits(model, env["batch"]))


def test_trainable_mismatches_are_errors_listing_keys(env, tmp_path):
    model, tok = env["model"], env["tok"]
    save_trainable(model, tmp_path)
    path = tmp_path / "non_lora_trainables.safetensors"
    state = load_file(path)
    del state["fusion.attn_norm.bias"]
    state["fusion.extra.weight"] = torch.zeros(1)
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys \[fusion.attn_norm.bias\].*unknown keys \[fusion.extra.weight\]"):
        load_trainable(fresh(model.config, tok), tmp_path)

    bigger = ModelConfig.from_dict({"lora": {"r": 4, "alpha": 16}}, base=model.config)
    with pytest.raises(CheckpointError, match="r=8 but the model has lora.r=4"):
        load_trainable(fresh(bigger, tok), tmp_path)
    no_lora = ModelConfig.from_dict({"lora": {"enabled": False}}, base=model.config)
    with pytest.raises(CheckpointError, match="lora.enabled=True"):
        load_trainable(fresh(no_lora, tok), tmp_path)


# ---------------------------------------------------------------------- merged export
def test_export_merged_round_trip(env, tmp_path):
    model, tok = env["model"], env["tok"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_merged(model, tok, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # export leaves the model alone
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["model_type"] == "fakereasoning" and meta["model"]["lora"]["enabled"] is False
    assert (meta["model"]["clip"]["path"], meta["model"]["dino"]["path"], meta["model"]["llm"]["path"]) == (None,) * 3

    loaded, loaded_tok = load_pretrained(tmp_path)
    assert loaded_tok.encode("This image is real.") == tok.encode("This image is real.")
    # Merged weights are exactly peft's own merge.
    peft_merged = copy.deepcopy(model.llm).merge_and_unload().state_dict()
    assert peft_merged.keys() == loaded.llm.state_dict().keys()
    assert all(torch.equal(peft_merged[k], v) for k, v in loaded.llm.state_dict().items())
    out = logits(loaded, env["batch"])
    assert torch.allclose(out, env["logits"], atol=1e-5, rtol=0)  # (W + BA)x vs Wx + BAx: rounding only
    # Export of the loaded model writes the same tensors again.
    export_merged(loaded, loaded_tok, tmp_path / "again")
    a, b = load_file(tmp_path / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Sharded export reads back identically; LoRA on top of it starts as a no-op.
    export_merged(model, tok, tmp_path / "sharded", max_shard_bytes=200_000)
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    sharded, _ = load_pretrained(tmp_path / "sharded")
    assert torch.equal(logits(sharded, env["batch"]), out)
    with_lora, _ = load_pretrained(tmp_path, config_overrides={"lora": {"enabled": True}})
    assert any(p.requires_grad for n, p in with_lora.named_parameters() if "lora_B" in n)
    assert torch.equal(logits(with_lora, env["batch"]), out)


# ---------------------------------------------------------------------- reference formats
def write_reference_merged(env, src: Path, dst: Path, fmt: str, extra=None, drop=()) -> None:
    """Format (a) written from a merged export: reference key names, llava_llama config."""
    state = {}
    for clean, t in load_file(src / "model.safetensors").items():
        ref = to_reference(clean)
        if ref is not None and ref not in drop:
            # The reference's bias MLP may be Linear layers: store 2-D weights to check the reshape.
            state[ref] = t.flatten(1) if "attention_mlp" in ref and t.dim() == 4 else t
    state["model.vision_tower.vision_tower.vision_model.post_layernorm.weight"] = torch.ones(64)
    state.update(extra or {})
    dst.mkdir(parents=True)
    if fmt == "safetensors":
        save_file(state, dst / "model.safetensors")
    else:
        torch.save(state, dst / "pytorch_model.bin")
    llm = env["model"].config.llm
    (dst / "config.json").write_text(json.dumps({
        "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
        "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_layers, "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads, "vocab_size": env["model"].llm.get_input_embeddings().num_embeddings,
        "rms_norm_eps": llm.rms_norm_eps, "max_position_embeddings": llm.max_position_embeddings,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_hidden_size": 64, "mm_vision_tower": "openai/clip-vit-large-patch14-336", "image_aspect_ratio": "pad"}))
    env["tok"].save_pretrained(dst)


@pytest.fixture(scope="module")
def merged(env, tmp_path_factory):
    d = tmp_path_factory.mktemp("merged")
    export_merged(env["model"], env["tok"], d)
    model, _ = load_pretrained(d)
    return d, logits(model, env["batch"])


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_reference_merged_import_matches_the_source(env, merged, tmp_path, fmt):
    src, want = merged
    write_reference_merged(env, src, tmp_path / "ref", fmt)
    base = ModelConfig.from_dict({"lora": {"enabled": False}}, base=env["with_paths"])
    model, tok = import_reference(tmp_path / "ref", base)
    assert torch.equal(logits(model, env["batch"]), want)
    with_lora, _ = import_reference(tmp_path / "ref", env["with_paths"])  # fresh adapters: same outputs
    assert torch.equal(logits(with_lora, env["batch"]), want)


def test_reference_merged_import_lists_missing_and_unknown_keys(env, merged, tmp_path):
    src, _ = merged
    write_reference_merged(env, src, tmp_path / "ref", "safetensors",
                           extra={"model.crossattention.mhatt.0.linear_x.weight": torch.zeros(1),
                                  "model.extra_head.weight": torch.zeros(1)},
                           drop=("model.crossattention.norm.1.b_2", "model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"unknown keys \[model.crossattention.mhatt.0.linear_x.weight\]"):
        import_reference(tmp_path / "ref", env["with_paths"])
    state = load_file(tmp_path / "ref" / "model.safetensors")
    del state["model.crossattention.mhatt.0.linear_x.weight"]
    save_file(state, tmp_path / "ref" / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        import_reference(tmp_path / "ref", env["with_paths"])
    msg = str(err.value)
    assert "missing keys [model.crossattention.norm.1.b_2, model.layers.1.mlp.up_proj.weight]" in msg
    assert "unknown keys [model.extra_head.weight]" in msg


def _tower_copies(env) -> dict:
    """Whole frozen tower copies under reference-style wrapper names: LLaVA's
    CLIPVisionTower keeps the CLIPVisionModel as `.vision_tower`, saved (transformers
    4.x) with its `vision_model.` level; a DINO wrapper alike."""
    towers = {}
    for prefix, tower in (("model.vision_tower.vision_tower.vision_model.", env["model"].clip_tower),
                          ("model.dino_tower.dino_tower.", env["model"].dino_tower)):
        towers.update({prefix + k: v.clone() for k, v in tower.model.state_dict().items()})
    return towers


def test_reference_tower_copies_are_ignored_with_their_count_logged(env, merged, tmp_path, caplog):
    src, want = merged
    write_reference_merged(env, src, tmp_path / "ref", "safetensors",
                           extra={"model.dino_tower.blocks.0.norm1.weight": torch.ones(64),
                                  "model.dino_tower.blocks.0.norm1.bias": torch.zeros(64)})
    with caplog.at_level(logging.INFO, logger="modeling.checkpoints.reference"):
        model, _ = import_reference(tmp_path / "ref", env["with_paths"])
    assert torch.equal(logits(model, env["batch"]), want)
    assert "ignored 3 tensors (model.vision_tower.*: 1, model.dino_tower.*: 2)" in caplog.text


def test_reference_tower_copies_load_on_request_when_they_match(env, merged, tmp_path, caplog):
    src, want = merged
    write_reference_merged(env, src, tmp_path / "ref", "bin", extra=_tower_copies(env))
    no_paths = ModelConfig.preset("tiny")  # the towers start random unless the file's copies are loaded
    with caplog.at_level(logging.INFO, logger="modeling.checkpoints.reference"):
        model, _ = import_reference(tmp_path / "ref", no_paths, load_towers=True)
    assert torch.equal(logits(model, env["batch"]), want)
    n_clip = len(env["model"].clip_tower.model.state_dict())
    assert f"clip_tower loaded from model.vision_tower.vision_tower.vision_model.* ({n_clip} tensors)" in caplog.text
    ignoring, _ = import_reference(tmp_path / "ref", no_paths)  # default: ignored, random towers
    assert not torch.equal(logits(ignoring, env["batch"]), want)

    copies = _tower_copies(env)
    del copies["model.dino_tower.dino_tower.layernorm.bias"]
    copies["model.dino_tower.dino_tower.extra.weight"] = torch.zeros(1)
    write_reference_merged(env, src, tmp_path / "bad", "safetensors", extra=copies)
    with pytest.raises(CheckpointError, match=r"load_towers=True but model\.dino_tower\.dino_tower\.\* does not match "
                                              r"dino_tower\.model \(model\.dino_backend=transformers\): lacks "
                                              r"\[layernorm\.bias\]; has unknown \[extra\.weight\]"):
        import_reference(tmp_path / "bad", no_paths, load_towers=True)


@pytest.mark.parametrize("adapter_ext", ["safetensors", "bin"])
def test_reference_lora_output_imports_to_identical_outputs(env, tmp_path, adapter_ext):
    model, tok = env["model"], env["tok"]
    params = dict(model.named_parameters())
    state = model.state_dict()
    # Base: a plain LLaMA directory with the un-adapted LLM weights.
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    base = {k[len("llm.base_model.model."):].replace(".base_layer.", "."): v for k, v in state.items()
            if k.startswith("llm.") and ".lora_" not in k}
    save_file(base, base_dir / "model.safetensors")
    (base_dir / "config.json").write_text(json.dumps({"model_type": "llama", **_llama_fields(model)}))
    tok.save_pretrained(base_dir)
    # LoRA output: peft adapter + non_lora_trainables.bin with base_model.model. prefixes.
    out = tmp_path / "lora"
    out.mkdir()
    adapter = {k[len("llm."):].replace(".default.", "."): p.detach() for k, p in params.items() if ".lora_" in k}
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in adapter
    if adapter_ext == "safetensors":
        save_file(adapter, out / "adapter_model.safetensors")
    else:
        torch.save(adapter, out / "adapter_model.bin")
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
        "bias": "none", "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}))
    non_lora = {}
    for k, v in state.items():
        ref = to_reference(k) if k.startswith(("clip_projector.", "dino_projector.", "fusion.")) else None
        if ref is not None:
            non_lora["base_model.model." + ref] = v
    torch.save(non_lora, out / "non_lora_trainables.bin")
    (out / "config.json").write_text(json.dumps({"model_type": "llava_llama", "mm_projector_type": "mlp2x_gelu",
                                                  "mm_hidden_size": 64, **_llama_fields(model)}))

    imported, _ = import_reference(out, env["with_paths"], base_model_dir=base_dir)
    assert torch.equal(logits(imported, env["batch"]), env["logits"])
    with pytest.raises(CheckpointError, match="needs base_model_dir"):
        import_reference(out, env["with_paths"])


def _llama_fields(model) -> dict:
    llm = model.config.llm
    return {"hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
            "num_hidden_layers": llm.num_layers, "num_attention_heads": llm.num_heads,
            "num_key_value_heads": llm.num_kv_heads, "rms_norm_eps": llm.rms_norm_eps,
            "vocab_size": model.llm.get_input_embeddings().num_embeddings,
            "max_position_embeddings": llm.max_position_embeddings}


class _Payload:
    """Unpickling this would create a file: weights_only loading must refuse it."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_bin_files_are_read_with_weights_only(env, merged, tmp_path):
    src, _ = merged
    write_reference_merged(env, src, tmp_path / "ref", "bin")
    state = torch.load(tmp_path / "ref" / "pytorch_model.bin", weights_only=True)
    marker = tmp_path / "code-ran"
    state["model.evil"] = _Payload(str(marker))
    torch.save(state, tmp_path / "ref" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        import_reference(tmp_path / "ref", env["with_paths"])
    assert not marker.exists()


# ---------------------------------------------------------------------- telling the formats apart
def test_checkpoint_format_names_each_format(env, merged, tmp_path):
    save_trainable(env["model"], tmp_path / "trainable")
    write_reference_merged(env, merged[0], tmp_path / "ref_merged", "safetensors")
    lora_out = tmp_path / "ref_lora"  # format (b): the reference's LoRA output needs no config.json
    lora_out.mkdir()
    torch.save({}, lora_out / "non_lora_trainables.bin")
    assert checkpoint_format(tmp_path / "trainable") == "trainable"
    assert checkpoint_format(merged[0]) == "merged"
    assert checkpoint_format(tmp_path / "ref_merged") == "reference"
    assert checkpoint_format(lora_out) == "reference"
    with pytest.raises(CheckpointError, match="ref_merged: a reference checkpoint; load it with import_reference"):
        load_for_inference(tmp_path / "ref_merged")


def test_checkpoint_format_of_an_unknown_folder_says_what_it_found(tmp_path):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (llama / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"llama: not a FakeReasoning checkpoint \(found config.json with "
                                              r"model_type 'llama'; files \['config.json', 'model.safetensors'\]\)"):
        checkpoint_format(llama)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="found model_config.json with format 'something-else'"):
        load_for_inference(other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: not a FakeReasoning checkpoint \(found no files\)"):
        checkpoint_format(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="absent: checkpoint folder does not exist"):
        checkpoint_format(tmp_path / "absent")
