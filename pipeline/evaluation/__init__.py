"""Evaluation stage: generation, parsing, metrics and reports (DESIGN section 6).

- ``parsing``: generated answer -> decision, parse status, reasoning text;
- ``metrics``: BLEU-1 / ROUGE-L / CSS, accuracy in the reference and strict
  conventions, AUC/AP, per generator and averaged over a set;
- ``report``: results.json, results.md, predictions.jsonl and plots;
- ``runner``: the multi-rank scoring loop used by ``launch/eval.py``.

Submodules are imported explicitly so that importing the pure metric code does
not pull in torch, DeepSpeed or the model.
"""
