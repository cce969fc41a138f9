"""Evaluation stage: generation, parsing, metrics and reports (docs/architecture.md, section 5).

- ``parsing``: generated answer -> decision, parse status, reasoning text;
- ``metrics``: BLEU-1 / ROUGE-L / CSS, accuracy in the reference and strict
  conventions, AUC/AP, per generator and averaged over a set;
- ``report``: results.json, results.md, predictions.jsonl and plots;
- ``runner``: the multi-rank scoring loop; ``cli``: its command line (``fakereasoning-eval``,
  ``python -m pipeline.evaluation``, ``launch/eval.py`` in a checkout);
- ``video``: video-level scores of frame sets (mean frame p_fake) and the optional face crop;
- ``perturbations``: robustness sweeps (JPEG, resize, blur of the decoded image);
- ``calibration``: ECE / NLL / Brier of p_fake and the threshold chosen on a held-out set;
- ``diagnostic_plots``: reliability diagrams and robustness curves.

Submodules are imported explicitly so that importing the pure metric code does
not pull in torch, DeepSpeed or the model.
"""
