"""Model input paths: existence and kind named per field; damaged weight files named by path."""
from __future__ import annotations

import json

import pytest
import torch

from modeling.checkpoints.tensor_io import CheckpointError, read_tensor_file, read_weights, write_weights
from modeling.config import ModelConfig
from common.config_loading import ConfigError
from modeling.checkpoints.input_paths import check_model_paths
from modeling.tokenization.loading import TokenizerLoadError, load_tokenizer


def model_folder(path, truncate: bool = False):
    """A transformers-style folder: config.json and a real model.safetensors (cut in half if `truncate`)."""
    write_weights({"w": torch.arange(1000, dtype=torch.float32)}, path)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    weights = path / "model.safetensors"
    if truncate:
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    return path


def check(**model):
    """check_model_paths of the tiny preset with `model` (a nested partial dict) applied."""
    check_model_paths(ModelConfig.from_dict(model, base=ModelConfig.preset("tiny")))


def test_a_truncated_safetensors_file_is_named_by_every_reader(tmp_path):
    folder = model_folder(tmp_path / "m", truncate=True)
    weights = folder / "model.safetensors"
    for read in (lambda: read_tensor_file(weights), lambda: read_weights(folder)):
        with pytest.raises(CheckpointError, match=rf"^{weights}: not a readable safetensors file.*incomplete"):
            read()
    from modeling.checkpoints.base import inspect_base

    with pytest.raises(CheckpointError, match=str(weights)):
        inspect_base(folder)


@pytest.mark.parametrize("field", ["llm", "clip"])
def test_model_folders(tmp_path, field):
    name = f"model.{field}.path"
    with pytest.raises(ConfigError, match=rf"^{name}='{tmp_path}/absent': does not exist \(expected a model folder"):
        check(**{field: {"path": str(tmp_path / "absent")}})
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=rf"^{name}='{tmp_path}/file': is a file, expected a model folder"):
        check(**{field: {"path": str(tmp_path / "file")}})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=rf"^{name}=.*empty': holds no config.json, so it is not a model folder"):
        check(**{field: {"path": str(tmp_path / "empty")}})
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=rf"^{name}=.*no weight file found"):
        check(**{field: {"path": str(no_weights)}})
    bad = model_folder(tmp_path / "bad", truncate=True)
    with pytest.raises(ConfigError, match=rf"^{name}: {bad / 'model.safetensors'}: not a readable safetensors"):
        check(**{field: {"path": str(bad)}})
    check(**{field: {"path": str(model_folder(tmp_path / "good"))}})


def test_an_index_naming_a_missing_shard(tmp_path):
    folder = tmp_path / "sharded"
    write_weights({"a": torch.zeros(300), "b": torch.zeros(300)}, folder, max_shard_bytes=1500)
    (folder / "config.json").write_text("{}")
    gone = sorted(folder.glob("model-*.safetensors"))[-1]
    gone.unlink()
    with pytest.raises(ConfigError, match=rf"^model\.llm\.path=.*{gone.name} \(listed by the weight index\) does not"):
        check(llm={"path": str(folder)})


def test_dino_path_by_backend(tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.dino\.path=.*does not exist \(expected a weight file"):
        check(dino={"path": str(tmp_path / "dinov2_vitl14_pretrain.pth")})
    folder = model_folder(tmp_path / "dino")
    check(dino={"path": str(folder)})  # a Dinov2Model folder: the transformers backend reads it
    with pytest.raises(ConfigError, match=r"^model\.dino\.path=.*is a folder, expected a weight file"):
        check(dino={"path": str(folder)}, dino_backend="timm")
    cut = model_folder(tmp_path / "cut", truncate=True) / "model.safetensors"
    with pytest.raises(ConfigError, match=rf"^model\.dino\.path: {cut}: not a readable safetensors"):
        check(dino={"path": str(cut)}, dino_backend="timm")


def test_tokenizer_folder_kinds(tmp_path):
    with pytest.raises(TokenizerLoadError, match="absent: does not exist"):
        load_tokenizer(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(TokenizerLoadError, match="file: is a file, expected a tokenizer folder"):
        load_tokenizer(tmp_path / "file")
    with pytest.raises(TokenizerLoadError, match="holds no tokenizer.json or tokenizer.model or tokenizer_config"):
        load_tokenizer(tmp_path)
