"""The exported tokenizer loads with the oldest transformers the package allows, and the last 4.x.

Each case pip-installs that transformers (and whichever of its requirements this
environment does not satisfy, e.g. the older `tokenizers` and `huggingface_hub`
it pins) into a temporary --target folder, leaving the test environment alone,
then runs `AutoTokenizer.from_pretrained` on an export in a subprocess with that
folder first on PYTHONPATH. The ids must equal those of the installed
transformers and of modeling's own loader. Marked slow: it needs PyPI, and
skips, saying so, when PyPI cannot be reached.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version
from transformers import AutoTokenizer

from modeling.checkpoints.checkpoint import export_merged, save_trainable
from modeling.config import ModelConfig
from modeling.model import FakeReasoningModel
from modeling.tokenization.tokenizer import CPM_PREFIX, build_bpe_tokenizer, demo_corpus
from modeling.tokenization.loading import load_tokenizer
from sharding import schema

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[4]
EXTRA_SPECIAL = "<mask>"
TEXTS = [
    CPM_PREFIX,
    f"{CPM_PREFIX} real. </CONCLUSION>",
    "<s> USER: <image>\nIs this image real or fake? ASSISTANT: <SUMMARY> s </SUMMARY></s>",
    f"<unk><pad>{EXTRA_SPECIAL} <REASONING>Odd  spacing,\ttabs and ünïcode.</REASONING>",
]
# Runs under the installed-elsewhere transformers: what AutoTokenizer gives for each folder.
PROBE = """
import json, sys, transformers
from transformers import AutoTokenizer
texts = json.loads(sys.argv[1])
out = {"version": transformers.__version__}
for folder in sys.argv[2:]:
    t = AutoTokenizer.from_pretrained(folder)
    out[folder] = {"ids": [t.encode(x) for x in texts], "specials": [t.bos_token, t.eos_token, t.unk_token,
                   t.pad_token], "len": len(t), "decoded": [t.decode(t.encode(x)) for x in texts]}
print(json.dumps(out))
"""


def transformers_requirement() -> Requirement:
    """The package's transformers requirement, from setup.cfg's install_requires."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg", encoding="utf-8")
    deps = cfg["options"]["install_requires"].splitlines()
    for line in deps:
        if line.strip() and Requirement(line).name == "transformers":
            return Requirement(line)
    raise AssertionError("the package declares no transformers requirement")


def lower_bound() -> str:
    bounds = [s.version for s in transformers_requirement().specifier if s.operator == ">="]
    assert bounds, f"transformers requirement {transformers_requirement()} has no lower bound"
    return bounds[0]


def _pip(target: Path, specs: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--target", str(target), *specs]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode == 0:
        return
    try:
        urllib.request.urlopen("https://pypi.org/simple/transformers/", timeout=15).close()
    except OSError as exc:
        pytest.skip(f"PyPI is unreachable ({exc}); cannot install {specs}")
    raise AssertionError(f"pip install {specs} failed:\n{done.stderr[-3000:]}")


def _unsatisfied_requirements(dist_info: Path) -> list[str]:
    """The installed transformers' base requirements that this environment does not meet."""
    missing = []
    for line in importlib.metadata.Distribution.at(dist_info).requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an optional extra, or another platform's
        try:
            ok = req.specifier.contains(importlib.metadata.version(req.name), prereleases=True)
        except importlib.metadata.PackageNotFoundError:
            ok = False
        if not ok:
            missing.append(f"{req.name}{req.specifier}")
    return missing


def install_transformers(spec: str, target: Path) -> Path:
    _pip(target, [f"transformers{spec}"])
    dist_info = next(target.glob("transformers-*.dist-info"))
    needed = _unsatisfied_requirements(dist_info)
    if needed:
        _pip(target, needed)
    return target


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A merged export and a trainable checkpoint of a tiny model, and the current loaders' view of them."""
    root = tmp_path_factory.mktemp("lower_bound")
    tok = build_bpe_tokenizer(demo_corpus(schema.ATTRIBUTES, [schema.EVAL_QUESTION]), root / "tok", vocab_size=600)
    # An extra special token makes transformers 5 write "extra_special_tokens", a key
    # transformers 4 reads differently (modeling/tokenization/export.py).
    tok.add_special_tokens({"extra_special_tokens": [EXTRA_SPECIAL]})
    torch.manual_seed(0)
    model = FakeReasoningModel(ModelConfig.preset("tiny"), tok).eval()
    folders = [export_merged(model, tok, root / "merged"), save_trainable(model, root / "trainable")]
    for folder in folders:
        current = AutoTokenizer.from_pretrained(folder)
        ours = load_tokenizer(folder)
        assert [current.encode(x) for x in TEXTS] == [ours.encode(x) for x in TEXTS] == [tok.encode(x) for x in TEXTS]
    return folders, {str(f): [tok.encode(x) for x in TEXTS] for f in folders}, tok


def _cases() -> list:
    bound = lower_bound()
    cases = [pytest.param(f"=={bound}", bound, id=f"lower-bound-{bound}")]
    if Version(bound).major < 5:  # the newest 4.x is allowed too; the issue saw 4.57 fail
        cases.append(pytest.param("<5", "4.", id="last-4.x"))
    return cases


@pytest.mark.parametrize(("spec", "version_prefix"), _cases())
def test_exported_tokenizer_loads_with_older_transformers(exports, tmp_path, spec, version_prefix):
    folders, want, tok = exports
    target = install_transformers(spec, tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(TEXTS), *map(str, folders)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"AutoTokenizer failed under transformers{spec}:\n{done.stderr[-3000:]}"
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["version"].startswith(version_prefix) and not got["version"].startswith("5.")
    for folder in map(str, folders):
        assert got[folder]["ids"] == want[folder], f"{folder}: other ids under transformers {got['version']}"
        assert got[folder]["specials"] == [tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token]
        assert got[folder]["len"] == len(tok)
        assert got[folder]["decoded"] == [tok.decode(tok.encode(x)) for x in TEXTS]
