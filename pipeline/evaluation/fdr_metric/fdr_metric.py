"""FDR metric: the FakeReasoning evaluation metric as a Hugging Face `evaluate` module.

Load it offline (no hub access is needed or attempted); it ships inside the
installed package:

    import evaluate
    from pipeline.evaluation.metrics import FDR_METRIC_DIR
    m = evaluate.load(FDR_METRIC_DIR)      # HF_EVALUATE_OFFLINE=1 keeps evaluate off the hub

`evaluate` copies this script into its modules cache before importing it, so
the script cannot import files next to it; it imports the project's package
instead, so the numbers are computed by exactly the code that
`fakereasoning-eval` uses.
"""
import datasets
import evaluate

from pipeline.evaluation.metrics import CSSScorer, group_metrics, text_scores
from pipeline.evaluation.parsing import parse_answer

_CITATION = """\
@inproceedings{gao2025fakereasoning,
  title={FakeReasoning: Towards Generalizable Forgery Detection and Reasoning},
  author={Gao, Yueying and Chang, Dongliang and Yu, Bingyao and Qin, Haotian and Chen, Lei and Liang, Kongming and Ma, Zhanyu},
  year={2025}
}
"""

_DESCRIPTION = """\
Forgery Detection and Reasoning (FDR) metrics of MMFR: the generated answer is parsed into a
decision (<CONCLUSION>This image is fake./real.</CONCLUSION>) and a reasoning (<REASONING>...</REASONING>).
BLEU-1 (NLTK sentence_bleu, weights (1,0,0,0), whitespace tokens) and ROUGE-L F1 (rouge-score, stemming)
compare the reasoning with the reference reasoning; accuracy compares the decision with the label,
in the reference convention (unparseable answers left out) and the strict one (counted wrong).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated answers (full text with <REASONING> and <CONCLUSION>).
    references: list of reference reasoning texts ("" when the image has none).
    labels: optional list of int, 1 fake / 0 real; without it no accuracy is returned.
    clip_text_model: optional local path of a CLIP text model for CSS.
Returns:
    bleu1, rouge_l (, css): mean over answers whose reference is not empty, unparseable answers left out;
    bleu1_strict, rouge_l_strict (, css_strict): the same over all answers;
    parse_failure_rate; with labels: accuracy, real_accuracy, fake_accuracy and their _strict versions.
Examples:
    >>> m = evaluate.load(FDR_METRIC_DIR)
    >>> m.compute(predictions=["<REASONING>smooth edges</REASONING><CONCLUSION>This image is real.</CONCLUSION>"],
    ...           references=["smooth natural edges"], labels=[0])["accuracy"]
    1.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FdrMetric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://github.com/PRIS-CV/FakeReasoning"],
        )

    def _compute(self, predictions, references, labels=None, clip_text_model=None):
        if labels is not None and len(labels) != len(predictions):
            raise ValueError(f"{len(labels)} labels for {len(predictions)} predictions")
        parsed = [parse_answer(p) for p in predictions]
        css = CSSScorer(clip_text_model) if clip_text_model else None
        scores = text_scores(list(references), [p.reasoning for p in parsed], css)
        rows = [
            {
                # Without labels only the text metrics and the parse rate are
                # meaningful; a constant label keeps group_metrics' shape.
                "label": int(labels[i]) if labels is not None else 0,
                "pred": p.pred,
                "parse_status": p.parse_status,
                "p_fake": None,
                "reference": references[i],
                **scores[i],
            }
            for i, p in enumerate(parsed)
        ]
        m = group_metrics(rows)
        keys = ["bleu1", "rouge_l", "bleu1_strict", "rouge_l_strict", "parse_failure_rate"]
        if css is not None:
            keys += ["css", "css_strict"]
        out = {k: m[k] for k in keys}
        if labels is not None:
            out.update(
                accuracy=m["acc"], real_accuracy=m["real_acc"], fake_accuracy=m["fake_acc"],
                accuracy_strict=m["acc_strict"], real_accuracy_strict=m["real_acc_strict"],
                fake_accuracy_strict=m["fake_acc_strict"],
            )
        return out
