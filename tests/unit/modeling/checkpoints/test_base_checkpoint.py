"""Starting from a published LLaVA base checkpoint at `llm.path` (llava-v1.5-13b, MoF_Models).

The folders are written here the way those releases are laid out: a
`llava_llama` config.json (LlamaConfig fields plus LLaVA's mm_* fields), LLaMA
tensors with the projector(s) under model.mm_projector.* / model.dino_mm_projector.*,
sometimes frozen tower copies, in sharded .bin (with pytorch_model.bin.index.json)
or safetensors files.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from modeling.checkpoints.base import inspect_base
from modeling.checkpoints.tensor_io import CheckpointError
from modeling.config import ConfigError, ModelConfig
from modeling.llm import causal_lm
from modeling.model import FakeReasoningModel
from modeling.tokenization.tokenizer import build_bpe_tokenizer, demo_corpus
from sharding import schema

TINY = ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    torch.set_num_threads(1)
    return build_bpe_tokenizer(demo_corpus(schema.ATTRIBUTES, [schema.EVAL_QUESTION]),
                               tmp_path_factory.mktemp("tok") / "tok", vocab_size=600)


def llava_config(vocab: int, **overrides) -> dict:
    """config.json of a llava_llama folder, with the tiny preset's LLM shape."""
    llm = TINY.llm
    cfg = {
        "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"], "_name_or_path": "MoF_Models",
        "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_layers, "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads, "vocab_size": vocab, "rms_norm_eps": llm.rms_norm_eps,
        "max_position_embeddings": llm.max_position_embeddings, "hidden_act": "silu", "initializer_range": 0.02,
        "pretraining_tp": 1, "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
        "use_cache": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "transformers_version": "4.31.0",
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": TINY.clip.hidden_size,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad", "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False,
        "use_mm_proj": True, "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
    }
    cfg.update(overrides)
    return cfg


def source_llm(vocab: int) -> LlamaForCausalLM:
    fields = {k: v for k, v in llava_config(vocab).items() if k not in ("model_type", "architectures")}
    torch.manual_seed(7)
    return LlamaForCausalLM(LlamaConfig(**fields)).eval()


def projector(seed: int, in_dim: int, prefix: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = TINY.llm.hidden_size
    return {f"{prefix}0.weight": torch.randn(out, in_dim, generator=g),
            f"{prefix}0.bias": torch.randn(out, generator=g),
            f"{prefix}2.weight": torch.randn(out, out, generator=g),
            f"{prefix}2.bias": torch.randn(out, generator=g)}


def towers() -> dict[str, torch.Tensor]:
    """A few frozen tower tensors, as MoF / released FakeReasoning folders carry them."""
    clip = "model.vision_tower.vision_tower.vision_model."
    return {clip + "embeddings.patch_embedding.weight": torch.randn(64, 3, 14, 14),
            clip + "post_layernorm.weight": torch.ones(64),
            "model.dino_tower.blocks.0.norm1.weight": torch.ones(64)}


def write_folder(d: Path, tensors: dict, config: dict, fmt: str, shards: int = 2) -> Path:
    """A LLaVA-release layout: tensors in `shards` files (the projectors in the last,
    as in llava-v1.5-13b), with an index when there is more than one."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config))
    names = sorted(tensors, key=lambda k: (k.startswith("model.mm_") or k.startswith("model.dino_mm_"), k))
    parts = [names[i::shards] for i in range(shards)] if shards > 1 else [names]
    if shards > 1:  # the projectors (sorted last) all go to the last shard
        proj = [n for n in names if n.startswith(("model.mm_", "model.dino_mm_"))]
        parts = [[n for n in p if n not in proj] for p in parts]
        parts[-1] += proj
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if ext == "safetensors" else "pytorch_model"
    files = [f"{stem}.{ext}"] if shards == 1 else [f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)]
    weight_map = {}
    for fname, part in zip(files, parts):
        shard = {n: tensors[n].contiguous() for n in part}
        if ext == "safetensors":
            save_file(shard, str(d / fname), metadata={"format": "pt"})
        else:
            torch.save(shard, d / fname, _use_new_zipfile_serialization=(fmt != "bin-legacy"))
        weight_map.update({n: fname for n in part})
    if shards > 1:
        (d / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def base_tensors(vocab: int, dino: bool = False, with_towers: bool = False) -> dict[str, torch.Tensor]:
    state = dict(source_llm(vocab).state_dict())
    state.update(projector(11, TINY.clip.hidden_size, "model.mm_projector."))
    if dino:
        state.update(projector(12, TINY.dino.hidden_size, "model.dino_mm_projector."))
    if with_towers:
        state.update(towers())
    return state


def config_at(path: Path, **llm) -> ModelConfig:
    return ModelConfig.from_dict({"llm": {"path": str(path), **llm}}, base=TINY)


def build(cfg: ModelConfig, tok, seed: int = 3) -> FakeReasoningModel:
    torch.manual_seed(seed)
    return FakeReasoningModel(cfg, tok)


def base_weights(model) -> dict[str, torch.Tensor]:
    """The LLM's weights under transformers' names (LoRA wrapping removed)."""
    return {k.replace(".base_layer.", "."): v for k, v in causal_lm(model.llm).state_dict().items()
            if ".lora_" not in k}


# Layouts of the published folders: llava-v1.5-13b (.bin shards, CLIP projector only),
# MoF (DINO projector too, tower copies), single-file mirrors, a legacy torch.save file.
LAYOUTS = [
    pytest.param("bin", 2, False, False, id="llava-v1.5-bin-shards"),
    pytest.param("safetensors", 2, True, True, id="mof-safetensors-shards-with-towers"),
    pytest.param("safetensors", 1, True, False, id="mof-single-safetensors"),
    pytest.param("bin-legacy", 1, False, True, id="legacy-single-bin-with-towers"),
]


@pytest.mark.parametrize("fmt,shards,dino,with_towers", LAYOUTS)
def test_llava_folder_initialises_llm_and_projectors(tok, tmp_path, caplog, fmt, shards, dino, with_towers):
    vocab = len(tok)
    tensors = base_tensors(vocab, dino=dino, with_towers=with_towers)
    d = write_folder(tmp_path / "base", tensors, llava_config(vocab), fmt, shards)
    with caplog.at_level(logging.INFO, logger="modeling.checkpoints.base"):
        model = build(config_at(d), tok)
    random_init = build(TINY, tok)  # same seed, no llm.path: what "starts random" means here

    got = base_weights(model)
    want = source_llm(vocab).state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    for name, prefix, present in (("clip_projector", "model.mm_projector.", True),
                                  ("dino_projector", "model.dino_mm_projector.", dino)):
        ours, fresh = getattr(model, name).state_dict(), getattr(random_init, name).state_dict()
        for k, v in ours.items():
            assert torch.equal(v, tensors[prefix + k] if present else fresh[k]), (name, k)
    for k, v in model.fusion.state_dict().items():
        assert torch.equal(v, random_init.fusion.state_dict()[k]), k  # fusion always starts random

    text = caplog.text
    loaded = "clip_projector <- model.mm_projector.* (4 tensors)"
    assert loaded + (", dino_projector <- model.dino_mm_projector.* (4 tensors)" if dino else "") in text
    assert ("starting random: fusion" if dino else "starting random: dino_projector, fusion") in text
    n_llm = len(want)
    assert f"{n_llm} LLM tensors loaded by transformers" in text
    if with_towers:
        assert ("ignored 3 frozen vision-tower tensors (model.vision_tower.*: 2, model.dino_tower.*: 1)") in text
    else:
        assert "vision-tower" not in text


def test_llama_folder_with_projector_tensors_keeps_them(tok, tmp_path, caplog):
    """model_type llama (transformers reads it by itself), but the files carry a
    projector: it initialises clip_projector instead of being dropped."""
    vocab = len(tok)
    tensors = base_tensors(vocab)
    config = {k: v for k, v in llava_config(vocab, model_type="llama", architectures=["LlamaForCausalLM"]).items()
              if not k.startswith("mm_")}
    d = write_folder(tmp_path / "vicuna-with-projector", tensors, config, "safetensors", 1)
    with caplog.at_level(logging.INFO, logger="modeling.checkpoints.base"):
        model = build(config_at(d), tok)
    for k, v in model.clip_projector.state_dict().items():
        assert torch.equal(v, tensors["model.mm_projector." + k])
    assert all(torch.equal(v, tensors[k]) for k, v in base_weights(model).items())
    assert "clip_projector <- model.mm_projector.*" in caplog.text


def test_projectors_are_loaded_in_the_model_dtype(tok, tmp_path):
    vocab = len(tok)
    tensors = base_tensors(vocab, dino=True)
    d = write_folder(tmp_path / "base", tensors, llava_config(vocab), "bin", 2)
    model = build(ModelConfig.from_dict({"dtype": "bfloat16"}, base=config_at(d)), tok)
    w = model.dino_projector[2].weight
    assert w.dtype == torch.bfloat16 and torch.equal(w, tensors["model.dino_mm_projector.2.weight"].bfloat16())


def _drop(key):
    return lambda t: {k: v for k, v in t.items() if k != key}


def _add(key, value):
    return lambda t: {**t, key: value}


FAILURES = [
    pytest.param(_add("model.mm_projector.0.weight", torch.zeros(64, 32)), {}, CheckpointError,
                 r"pytorch_model-00002-of-00002\.bin: model\.mm_projector\.0\.weight has shape \(64, 32\) but "
                 r"clip_projector\.0\.weight has \(64, 64\)", id="projector-shape"),
    pytest.param(_drop("model.dino_mm_projector.2.bias"), {}, CheckpointError,
                 r"model\.dino_mm_projector\.\* does not match dino_projector \(mlp2x_gelu\): lacks "
                 r"\[model\.dino_mm_projector\.2\.bias\]", id="partial-projector"),
    pytest.param(_drop("model.layers.1.mlp.up_proj.weight"), {}, CheckpointError,
                 r"the weight files lack \[model\.layers\.1\.mlp\.up_proj\.weight\]", id="missing-llm-tensor"),
    pytest.param(_add("model.extra_head.weight", torch.zeros(2)), {}, CheckpointError,
                 r"has no place for \(they would be dropped\): \[model\.extra_head\.weight\]", id="unknown-tensor"),
    pytest.param(_add("model.crossattention.mhatt.0.linear_q.weight", torch.zeros(64, 64)), {}, CheckpointError,
                 r"1 fusion tensors .* trained FakeReasoning checkpoint.*import_reference", id="fusion-tensors"),
    pytest.param(None, {"mm_projector_type": "linear"}, CheckpointError,
                 r"config\.json: mm_projector_type='linear' but model\.projector_type='mlp2x_gelu'",
                 id="projector-type"),
    pytest.param(None, {"mm_vision_select_layer": -1}, CheckpointError,
                 r"mm_vision_select_layer=-1 .* but clip\.select_layer=-2", id="select-layer"),
    pytest.param(None, {"model_type": "llava"}, CheckpointError,
                 r"model_type 'llava' is not supported as llm\.path", id="llava-hf-conversion"),
    # The config promises a third layer the files lack: never a silently random layer.
    pytest.param(None, {"num_hidden_layers": 3}, CheckpointError,
                 r"the weight files lack \[model\.layers\.2\.input_layernorm\.weight, ", id="config-says-more-layers"),
]


@pytest.mark.parametrize("edit_tensors,config_overrides,error,match", FAILURES)
def test_bad_base_folders_are_errors_naming_file_and_key(tok, tmp_path, edit_tensors, config_overrides, error, match):
    vocab = len(tok)
    tensors = base_tensors(vocab, dino=True)
    if edit_tensors is not None:
        tensors = edit_tensors(tensors)
    d = write_folder(tmp_path / "base", tensors, llava_config(vocab, **config_overrides), "bin", 2)
    with pytest.raises(error, match=match):
        build(config_at(d), tok)


def test_llm_fields_must_describe_the_loaded_model(tok, tmp_path):
    vocab = len(tok)
    d = write_folder(tmp_path / "base", base_tensors(vocab), llava_config(vocab), "bin", 2)
    with pytest.raises(ConfigError, match=r"llm\.intermediate_size=256 but the model has 128; "
                                          r"llm\.rms_norm_eps=1e-06 but the model has 1e-05"):
        build(config_at(d, intermediate_size=256, rms_norm_eps=1e-6), tok)


def test_inspect_base_names_tensors_without_reading_them(tok, tmp_path):
    vocab = len(tok)
    tensors = base_tensors(vocab, dino=True, with_towers=True)
    d = write_folder(tmp_path / "base", tensors, llava_config(vocab), "bin", 2)
    base = inspect_base(d)
    assert base.is_llava and set(base.files) == set(tensors)
    assert base.files["model.mm_projector.0.weight"].name == "pytorch_model-00002-of-00002.bin"
    assert base.tower_counts() == {"model.vision_tower.": 2, "model.dino_tower.": 1}
    assert "model.mm_projector.0.weight" not in base.llm_names() and "lm_head.weight" in base.llm_names()
    got = base.read(["model.mm_projector.2.bias"])
    assert list(got) == ["model.mm_projector.2.bias"] and torch.equal(got["model.mm_projector.2.bias"],
                                                                       tensors["model.mm_projector.2.bias"])


def test_a_llava_folder_without_projectors_is_warned(tok, tmp_path, caplog):
    vocab = len(tok)
    tensors = {k: v for k, v in base_tensors(vocab).items() if not k.startswith("model.mm_projector.")}
    d = write_folder(tmp_path / "llava-no-projector", tensors, llava_config(vocab), "safetensors", 1)
    with caplog.at_level(logging.WARNING, logger="modeling.checkpoints.base"):
        build(config_at(d), tok)
    assert "holds no model.mm_projector.* / model.dino_mm_projector.* tensors: both projectors start random" \
        in caplog.text
