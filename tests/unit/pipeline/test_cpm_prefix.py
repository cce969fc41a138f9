"""model.cpm.answer_prefix is resolved from (or checked against) the training
answers at start-up, so evaluation forces the conclusion the model trained on."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from pipeline.training.config import load_train_config
from pipeline.distributed import DistInfo
from pipeline.training.build import resolve_cpm_prefix

MAIN = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo")


def write_answers(path, answers: list[str]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, answer in enumerate(answers):
            meta = {"conversations": [[{"from": "human", "value": "<image>\nIs this image real or fake? "
                                        "Conclude with 'This image is real' or 'This image is fake'."},
                                       {"from": "gpt", "value": answer}]]}
            data = json.dumps(meta).encode()
            info = tarfile.TarInfo(f"s{i:04d}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    # The shards are found as the training stream finds them: listed in sizes.json.
    (path.parent / "sizes.json").write_text(json.dumps({path.name: len(answers)}))


def answer(word: str, after_tag: str = " ") -> str:
    return (f"<SUMMARY> s </SUMMARY> <CAPTION> c </CAPTION> <REASONING> r </REASONING> "
            f"<CONCLUSION>{after_tag}This image is {word}. </CONCLUSION>")


def cfg_for(shards, *overrides):
    return load_train_config(None, [f"data.train_shards={shards}", "data.max_length=512", *overrides])


def test_auto_takes_the_most_common_spelling_of_the_data(tmp_path):
    write_answers(tmp_path / "shard-000000.tar", [answer("fake")] * 5 + [answer("real", "")] * 2
                  + [answer("real", "\n")])
    assert resolve_cpm_prefix(cfg_for(tmp_path), MAIN) == "<CONCLUSION> This image is"
    write_answers(tmp_path / "shard-000000.tar", [answer("fake", "")] * 3 + [answer("real")])
    assert resolve_cpm_prefix(cfg_for(tmp_path), MAIN) == "<CONCLUSION>This image is"


def test_a_prefix_that_no_answer_contains_is_an_error_naming_it(tmp_path):
    write_answers(tmp_path / "shard-000000.tar", ["<REASONING> r </REASONING> <ANSWER> fake </ANSWER>"] * 4)
    with pytest.raises(ValueError, match=r"none of the first 4 training answers .*'<CONCLUSION> This image is'"):
        resolve_cpm_prefix(cfg_for(tmp_path), MAIN)
    write_answers(tmp_path / "shard-000000.tar", [answer("fake")] * 4)
    with pytest.raises(ValueError, match="'<VERDICT> It is'"):
        resolve_cpm_prefix(cfg_for(tmp_path, "model.cpm.answer_prefix=<VERDICT> It is"), MAIN)


def test_an_explicit_prefix_is_kept_and_a_different_data_spelling_warned(tmp_path, caplog):
    write_answers(tmp_path / "shard-000000.tar", [answer("fake")] * 4)
    cfg = cfg_for(tmp_path, "model.cpm.answer_prefix=<CONCLUSION>This image is")
    with caplog.at_level("WARNING", logger="pipeline.training"):
        assert resolve_cpm_prefix(cfg, MAIN) == "<CONCLUSION>This image is"
    assert "mostly spell it '<CONCLUSION> This image is'" in caplog.text


def test_the_cpm_disabled_needs_no_conclusion(tmp_path):
    write_answers(tmp_path / "shard-000000.tar", ["no tags at all"])
    assert resolve_cpm_prefix(cfg_for(tmp_path, "model.cpm.enabled=false"), MAIN) == "<CONCLUSION> This image is"
