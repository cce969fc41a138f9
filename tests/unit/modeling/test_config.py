"""ModelConfig presets, validation messages, (de)serialisation (ImageProcessor: test_image_processing.py)."""
import importlib.util

import pytest
import torch

from modeling.config import ConfigError, ModelConfig


def test_paper_preset_matches_the_recipe():
    cfg = ModelConfig.preset("paper")
    assert cfg.image_size == 336 and cfg.num_image_tokens == 576
    assert (cfg.clip.hidden_size, cfg.clip.num_layers, cfg.clip.patch_size) == (1024, 24, 14)
    assert cfg.clip.select_layer == -2
    assert (cfg.dino.hidden_size, cfg.dino.num_layers, cfg.dino.num_heads) == (1024, 24, 16)
    assert (cfg.llm.hidden_size, cfg.llm.num_layers, cfg.llm.vocab_size) == (5120, 40, 32000)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (128, 256, 0.05)
    assert (cfg.fusion.num_heads, cfg.fusion.dropout) == (16, 0.1)
    assert (cfg.cpm.temperature, cfg.cpm.weight, cfg.cpm.position) == (10.0, 1.0, "labels")
    assert cfg.llm.path is None and cfg.clip.path is None and cfg.dino.path is None


def test_tiny_preset_is_small():
    cfg = ModelConfig.preset("tiny")
    assert cfg.image_size % cfg.clip.patch_size == 0
    for width in (cfg.clip.hidden_size, cfg.dino.hidden_size, cfg.llm.hidden_size):
        assert 32 <= width <= 128
    assert cfg.llm.num_layers <= 3 and cfg.clip.num_layers <= 3 and cfg.dino.num_layers <= 3
    assert cfg.num_image_tokens == (56 // 14) ** 2


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset"):
        ModelConfig.preset("huge")


def test_dict_round_trip_and_partial_override():
    cfg = ModelConfig.preset("paper")
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    tiny = ModelConfig.preset("tiny")
    over = ModelConfig.from_dict({"cpm": {"temperature": 5.0}, "dino_backend": "timm"}, base=tiny)
    assert over.cpm.temperature == 5.0 and over.dino_backend == "timm"
    assert over.llm == tiny.llm and tiny.cpm.temperature == 10.0  # base untouched


@pytest.mark.parametrize("patch, field", [
    ({"llm": {"hidden_sze": 3}}, "llm.hidden_sze"),
    ({"image_size": 50}, "model.image_size"),
    ({"fusion": {"num_heads": 5}}, "fusion.num_heads"),
    ({"dino_backend": "torchhub"}, "model.dino_backend"),
    ({"cpm": {"position": "regex"}}, "cpm.position"),
    ({"cpm": {"temperature": 0}}, "cpm.temperature"),
    ({"llm": {"attn_implementation": "flash"}}, "llm.attn_implementation"),
    ({"clip": {"patch_size": 8}, "image_size": 56}, "patch_size"),
    ({"clip": {"select_layer": -9}}, "clip.select_layer"),
    ({"lora": {"target_modules": 3}}, "lora.target_modules"),
    ({"dino": {"intermediate_size": 100}}, "dino.intermediate_size"),
])
def test_invalid_values_name_the_field(patch, field):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(patch, base=ModelConfig.preset("tiny"))
    assert field in str(err.value)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available(),
                    reason="flash attention can run here")
def test_flash_attention_where_it_cannot_run_is_a_startup_error():
    cfg = ModelConfig.preset("tiny")
    cfg.llm.attn_implementation = "flash_attention_2"
    cfg.validate()  # statically fine ...
    with pytest.raises(ConfigError, match="llm.attn_implementation=flash_attention_2"):
        cfg.check_runtime()  # ... but not on this machine
