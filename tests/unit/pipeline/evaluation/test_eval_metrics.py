import math
import warnings

import pytest
from nltk.translate.bleu_score import sentence_bleu
from rouge_score import rouge_scorer
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.evaluation.metrics import (
    CSSScorer, auc_ap, bleu1, generator_order, group_metrics, rouge_l, set_metrics, text_scores,
)

REF = "The edges are smooth and natural. Lighting and shadows are consistent with the sun."
HYPOTHESES = [
    "",  # empty
    "edges",  # one word, in the reference
    "banana",  # one word, not in the reference
    "The edges are smooth and natural.",
    "Lighting and shadow is consistent; the edges were smoothed naturally by the sun.",
    REF,
    "   ",  # whitespace only
    "the the the the the",  # clipped counts
]


def _nltk(ref, hyp):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sentence_bleu([ref.split()], hyp.split(), weights=(1, 0, 0, 0))


@pytest.mark.parametrize("hyp", HYPOTHESES)
def test_bleu1_and_rouge_match_libraries_exactly(hyp):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert bleu1(REF, hyp) == _nltk(REF, hyp)
    assert rouge_l(REF, hyp) == scorer.score(REF, hyp)["rougeL"].fmeasure
    assert isinstance(bleu1(REF, hyp), float)


def test_degenerate_text_values_are_defined():
    # NLTK returns the int 0 for an empty hypothesis; we define it as 0.0.
    assert bleu1(REF, "") == 0.0 and rouge_l(REF, "") == 0.0
    assert bleu1(REF, "banana") == 0.0
    assert bleu1(REF, REF) == 1.0 and rouge_l(REF, REF) == 1.0
    # One word of the reference: precision 1 times the brevity penalty.
    n = len(REF.split())
    assert bleu1(REF, "edges") == pytest.approx(math.exp(1 - n))
    # stemming: "shadow"/"shadows" match in ROUGE-L but not in BLEU
    assert rouge_l("shadows", "shadow") == 1.0 and bleu1("shadows", "shadow") == 0.0


def test_text_scores_skip_empty_references():
    out = text_scores(["", REF], ["anything", "edges"])
    assert out[0] == {"bleu1": None, "rouge_l": None, "css": None}
    assert out[1]["bleu1"] == bleu1(REF, "edges") and out[1]["css"] is None


def _p(gen, label, pred, status=None, p_fake=0.5, bleu=0.0, ref="r"):
    status = status or ("ok" if pred is not None else "no_conclusion")
    return {"key": f"{gen}{label}{pred}{bleu}{p_fake}", "generator": gen, "label": label, "pred": pred,
            "parse_status": status, "p_fake": p_fake, "reference": ref,
            "bleu1": bleu, "rouge_l": bleu / 2, "css": None}


def test_both_conventions_with_unparseable_answers():
    flux = [
        _p("flux", 0, 0, bleu=0.8),
        _p("flux", 0, None, bleu=0.0),
        _p("flux", 1, 1, bleu=0.6),
        _p("flux", 1, 0, status="loose", bleu=0.4),
        _p("flux", 1, None, status="ambiguous", bleu=0.2),
    ]
    m = group_metrics(flux)
    assert (m["n"], m["n_real"], m["n_fake"], m["n_parsed"], m["n_unparseable"]) == (5, 2, 3, 3, 2)
    assert m["parse_failure_rate"] == pytest.approx(2 / 5)
    assert (m["real_acc"], m["fake_acc"], m["acc"]) == (1.0, 0.5, pytest.approx(2 / 3))
    assert (m["real_acc_strict"], m["fake_acc_strict"], m["acc_strict"]) == (0.5, pytest.approx(1 / 3), 0.4)
    assert m["bleu1"] == pytest.approx((0.8 + 0.6 + 0.4) / 3)
    assert m["bleu1_strict"] == pytest.approx((0.8 + 0.0 + 0.6 + 0.4 + 0.2) / 5)
    assert m["rouge_l"] == pytest.approx(m["bleu1"] / 2)
    assert m["css"] is None and m["css_strict"] is None  # not computed, never half-averaged

    dalle = [_p("dalle3", 0, 0, bleu=1.0), _p("dalle3", 1, 1, bleu=1.0)]
    s = set_metrics(flux + dalle + [_p("zzz", 1, 1), _p("zzz", 1, 1)])
    assert s["order"] == ["dalle3", "flux", "zzz"]
    assert s["average"]["acc"] == pytest.approx((1.0 + 2 / 3 + 1.0) / 3)
    assert s["average"]["acc_strict"] == pytest.approx((1.0 + 0.4 + 1.0) / 3)
    # zzz has no real image: its real accuracy is undefined and left out of the average
    assert s["generators"]["zzz"]["real_acc"] is None
    assert s["average"]["real_acc"] == pytest.approx((1.0 + 1.0) / 2)
    assert s["average"]["n"] == 9 and s["pooled"]["n"] == 9
    assert s["pooled"]["acc_strict"] == pytest.approx(6 / 9)


def test_all_unparseable_group():
    m = group_metrics([_p("if", 0, None), _p("if", 1, None)])
    assert m["acc"] is None and m["acc_strict"] == 0.0 and m["parse_failure_rate"] == 1.0


def test_inconsistent_rows_are_rejected():
    with pytest.raises(ValueError, match="parse_status"):
        group_metrics([_p("if", 0, 1, status="no_conclusion")])


def test_detection_only_rows_have_no_text_metrics():
    m = group_metrics([_p("x", 0, 0, ref=""), _p("x", 1, 1, ref="")])
    assert m["bleu1"] is None and m["n_text"] == 0 and m["acc"] == 1.0


def test_auc_ap_match_sklearn():
    labels = [0, 0, 1, 1, 0, 1, 1, 0]
    scores = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.55, 0.6]
    auc, ap = auc_ap(labels, scores)
    assert auc == roc_auc_score(labels, scores) and ap == average_precision_score(labels, scores)
    assert auc_ap([1, 1], [0.2, 0.3]) == (None, None)
    rows = [_p("g", lab, lab, p_fake=s) for lab, s in zip(labels, scores)]
    rows.append(_p("g", 1, 1, p_fake=None))  # no probability: left out of AUC only
    m = group_metrics(rows)
    assert m["auc"] == auc and m["ap"] == ap and m["n_p_fake"] == 8 and m["n"] == 9
    # CPM decision p_fake >= 0.5: wrong only on 0.35 (a fake called real) and 0.6 (a real called fake).
    assert m["cpm_acc"] == 6 / 8


def test_generator_order_follows_schema():
    assert generator_order({"gigagan", "custom", "stablediffusion", "a"}) == ["stablediffusion", "gigagan", "a", "custom"]


def test_css_scorer(tiny_clip):
    import torch

    big = CSSScorer(tiny_clip, batch_size=64)
    one = CSSScorer(tiny_clip, batch_size=1)
    refs = ["the cat sat on the mat", "smooth natural edges", "the image shows low quality", "dog"]
    hyps = ["the cat sat", "", "the image shows low quality", "a cat on mat texture is irregular"]
    a, b = big.score(refs, hyps), one.score(refs, hyps)
    assert a == pytest.approx(b, abs=1e-5)  # padding in a batch does not change an embedding
    assert a[1] == 0.0  # empty hypothesis
    assert a[2] == pytest.approx(1.0, abs=1e-6)
    e = big.embed([refs[0], hyps[0]])
    manual = torch.nn.functional.cosine_similarity(e[0:1], e[1:2]).item()
    assert a[0] == pytest.approx(manual, abs=1e-6) and -1.0 <= a[3] <= 1.0 and a[3] < 0.999
    # text longer than the model context is truncated, not an error
    assert len(big.score(["cat " * 100], ["dog " * 100])) == 1
    scores = text_scores(refs, hyps, big)
    assert [s["css"] for s in scores] == pytest.approx(a, abs=1e-6)


def test_css_scorer_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CSSScorer(str(tmp_path / "nope"))


def test_css_of_an_empty_hypothesis_in_reference_mode(tiny_clip):
    """The reference embeds "" with CLIP like any text; ours scores it 0."""
    import torch

    refs = ["smooth natural edges", "the cat sat on the mat"]
    hyps = ["", "the cat sat"]
    ours = CSSScorer(tiny_clip).score(refs, hyps)
    ref_mode = CSSScorer(tiny_clip, embed_empty=True)
    got = ref_mode.score(refs, hyps)
    e = ref_mode.embed(["", refs[0]])
    want = torch.nn.functional.cosine_similarity(e[0:1], e[1:2]).item()
    assert ours[0] == 0.0 and got[0] == pytest.approx(want, abs=1e-6) and abs(got[0]) > 1e-3
    assert got[1] == pytest.approx(ours[1], abs=1e-6)  # non-empty hypotheses are unchanged


def test_rouge_l_scores_a_bounded_prefix_of_an_unbounded_reference():
    from pipeline.evaluation.metrics import MAX_TEXT_METRIC_CHARS, rouge_l

    answer = "the edges are smooth and the lighting is natural"
    reference = answer + " " + "filler words " * 200_000  # 2.6 M characters
    assert rouge_l(reference, answer) == rouge_l(reference[:MAX_TEXT_METRIC_CHARS], answer)
    assert rouge_l(answer, answer) == 1.0  # short texts are scored whole, as before
