"""The `evaluate` module loads offline from its path in the repository and
gives the same numbers as pipeline.evaluation.metrics."""
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys, evaluate
m = evaluate.load(sys.argv[1], cache_dir=sys.argv[2])
preds = json.loads(sys.argv[3])
refs = json.loads(sys.argv[4])
print(json.dumps(m.compute(predictions=preds, references=refs, labels=[0, 1, 1, 0], clip_text_model=sys.argv[5])))
"""


def test_fdr_metric_loads_offline_and_matches(tmp_path, tiny_clip):
    import json

    from pipeline.evaluation.metrics import FDR_METRIC_DIR, CSSScorer, bleu1, rouge_l

    preds = [
        "<REASONING>The edges are smooth</REASONING><CONCLUSION>This image is real.</CONCLUSION>",
        "<REASONING>irregular edges</REASONING><CONCLUSION>This image is fake.</CONCLUSION>",
        "<REASONING>edges",
        "<REASONING></REASONING><CONCLUSION>This image is fake.</CONCLUSION>",
    ]
    refs = ["The edges are smooth and natural.", "Irregular image edges.", "Irregular edges.", "Natural texture."]
    env = dict(os.environ, HF_EVALUATE_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "modules"))
    # Run from an unrelated directory: only the module path and the installed package matter.
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, FDR_METRIC_DIR, str(tmp_path / "cache"),
         json.dumps(preds), json.dumps(refs), tiny_clip],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    parsed_idx = [0, 1, 3]
    hyps = ["The edges are smooth", "irregular edges", "edges", ""]
    assert out["bleu1"] == pytest.approx(sum(bleu1(refs[i], hyps[i]) for i in parsed_idx) / 3, abs=0)
    assert out["rouge_l_strict"] == pytest.approx(sum(rouge_l(r, h) for r, h in zip(refs, hyps)) / 4, abs=0)
    css = CSSScorer(tiny_clip).score(refs, hyps)
    assert out["css_strict"] == pytest.approx(sum(css) / 4, abs=1e-6)
    assert out["accuracy"] == pytest.approx(2 / 3) and out["accuracy_strict"] == 0.5
    assert out["fake_accuracy"] == 1.0 and out["real_accuracy"] == 0.5 and out["parse_failure_rate"] == 0.25
