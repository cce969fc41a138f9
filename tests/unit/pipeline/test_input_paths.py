"""Input paths of training and evaluation runs: checked by --check and at start-up, each named."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from pipeline.evaluation.cli import main as eval_main
from pipeline.training.cli import main as train_main
from modeling.checkpoints.tensor_io import write_weights
from common.config_loading import ConfigError
from pipeline.evaluation.config import EvalConfig
from pipeline.input_paths import check_train_inputs
from pipeline.training.config import load_train_config

TINY = str(Path(__file__).resolve().parents[3] / "launch" / "recipes" / "tiny-cpu.yaml")


def shard_set(root: Path, names=("shard-000000.tar",)) -> Path:
    """A shard folder as the sharder leaves it: tars of one sample each and their sizes.json."""
    root.mkdir(parents=True)
    for name in names:
        with tarfile.open(root / name, "w") as tar:
            data = json.dumps({"label": 0}).encode()
            info = tarfile.TarInfo("k0.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (root / "sizes.json").write_text(json.dumps({n: 1 for n in names}))
    return root


def checkpoint(path: Path, truncate: bool = False) -> Path:
    write_weights({"w": torch.zeros(1000)}, path)
    (path / "config.json").write_text(json.dumps({"model_type": "fakereasoning"}))
    if truncate:
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    return path


def train_check(*overrides):
    check_train_inputs(load_train_config(TINY, list(overrides)))


def test_training_shards(tmp_path):
    shards = shard_set(tmp_path / "train", ("shard-000000.tar", "shard-000001.tar"))
    train_check(f"data.train_shards={shards}")
    train_check(f"data.train_shards={shards}/shard-{{000000..000001}}.tar")
    with pytest.raises(ConfigError, match=r"^data\.train_shards='/nonexistent' does not exist \(expected a shard set"):
        train_check("data.train_shards=/nonexistent")
    with pytest.raises(ConfigError, match=rf"^data\.train_shards=.*{tmp_path}/absent/sizes\.json: its folder "):
        train_check(f"data.train_shards={tmp_path}/absent/shard-{{000000..000001}}.tar")
    (shards / "shard-000001.tar").unlink()
    with pytest.raises(ConfigError, match=r"sizes\.json lists 1 shard\(s\) that do not exist, first: .*000001"):
        train_check(f"data.train_shards={shards}")
    with pytest.raises(ConfigError, match=rf"^data\.train_shards=.*{tmp_path}/other\.json: no such file"):
        train_check(f"data.train_shards={shards}", f"data.sizes_file={tmp_path}/other.json")


def test_tokenizer_and_model_paths_at_training_start_up(tmp_path):
    shards = f"data.train_shards={shard_set(tmp_path / 'train')}"
    with pytest.raises(ConfigError, match=r"^tokenizer\.path='/nonexistent': does not exist"):
        train_check(shards, "tokenizer.path=/nonexistent")
    with pytest.raises(ConfigError, match=r"^tokenizer\.path=.*: holds no tokenizer\.json"):
        train_check(shards, f"tokenizer.path={tmp_path}")
    with pytest.raises(ConfigError, match=r"^model\.llm\.path='/nonexistent': does not exist"):
        train_check(shards, "model.llm.path=/nonexistent")
    cut = checkpoint(tmp_path / "llm", truncate=True)
    with pytest.raises(ConfigError, match=rf"^model\.clip\.path: {cut}/model\.safetensors: not a readable"):
        train_check(shards, f"model.clip.path={cut}")


def eval_config(tmp_path, **fields) -> EvalConfig:
    """A valid evaluation (a checkpoint folder, MMFR-style shards: one sub-folder per generator) with `fields`."""
    if not (tmp_path / "ckpt").is_dir():
        checkpoint(tmp_path / "ckpt")
        shard_set(tmp_path / "eval" / "gen1")
    values = {"checkpoint": str(tmp_path / "ckpt"), "out": str(tmp_path / "out"), "shards": str(tmp_path / "eval")}
    return EvalConfig(**{**values, **fields})


def test_evaluation_paths(tmp_path):
    cfg = eval_config(tmp_path).validate()
    with pytest.raises(ConfigError, match=r"^checkpoint=.*absent': does not exist \(expected a checkpoint folder"):
        eval_config(tmp_path, checkpoint=str(tmp_path / "absent")).validate()
    with pytest.raises(ConfigError, match=r"^checkpoint=.*sizes\.json': is a file, expected a checkpoint folder"):
        eval_config(tmp_path, checkpoint=str(tmp_path / "eval" / "gen1" / "sizes.json")).validate()
    with pytest.raises(ConfigError, match=r"^checkpoint=.*holds no config\.json or model_config\.json"):
        eval_config(tmp_path, checkpoint=str(tmp_path / "eval")).validate()
    cut = checkpoint(tmp_path / "cut", truncate=True)
    with pytest.raises(ConfigError, match=rf"^checkpoint: {cut}/model\.safetensors: not a readable safetensors"):
        eval_config(tmp_path, checkpoint=str(cut)).validate()
    with pytest.raises(ConfigError, match=r"^shards=.*absent': does not exist \(expected a folder\)"):
        eval_config(tmp_path, shards=str(tmp_path / "absent")).validate()
    with pytest.raises(ConfigError, match=r"^benchmarks\.b=.*: no shard set \(no sizes\.json in it or below it\)"):
        eval_config(tmp_path, benchmarks={"b": str(tmp_path / "ckpt")}).validate()
    with pytest.raises(ConfigError, match=r"^css_model='/nonexistent': does not exist \(expected a model folder"):
        eval_config(tmp_path, css_model="/nonexistent").validate()
    with pytest.raises(ConfigError, match=r"^reference_base_model=.*eval': holds no config\.json"):
        eval_config(tmp_path, reference_base_model=str(tmp_path / "eval")).validate()
    assert cfg.sets() == {"mmfr": str(tmp_path / "eval")}


def test_train_check_cli(tmp_path, capsys):
    """`launch/train.py --check`: 0 and the config printed, or 2 and the field named."""
    shards = f"data.train_shards={shard_set(tmp_path / 'train')}"
    assert train_main(["--config", TINY, "--check", shards, "model.cpm.temperature=1e-4"]) == 0
    assert "temperature: 0.0001" in capsys.readouterr().out
    for override, message in (("data.train_shards=/nonexistent", "data.train_shards='/nonexistent' does not exist"),
                              ("model.llm.path=/nonexistent", "model.llm.path='/nonexistent': does not exist"),
                              ("data.batch_size=true", "data.batch_size=True: must be an integer")):
        assert train_main(["--config", TINY, "--check", shards, override]) == 2
        assert "error: " in (err := capsys.readouterr().err) and message in err, err


def test_eval_check_cli(tmp_path, capsys):
    cfg = eval_config(tmp_path)
    base = ["--checkpoint", cfg.checkpoint, "--out", cfg.out, "--check"]
    assert eval_main([*base, "--shards", cfg.shards]) == 0
    assert "protocol: ours" in capsys.readouterr().out
    assert eval_main([*base, "--shards", str(tmp_path / "absent")]) == 2
    assert "shards=" in (err := capsys.readouterr().err) and "absent': does not exist" in err, err
