"""The robustness tables of a sweep (pipeline/evaluation/perturbations.py): per
set and perturbation kind, the set's average over generators clean (row 0) and
at each strength, for results.json "robustness" and results.md."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.evaluation.metrics import set_metrics
from pipeline.evaluation.perturbations import CLEAN, STRENGTH_NAMES, SWEEP_COLUMNS, Perturbation, by_kind
from pipeline.evaluation.table_format import format_value


def robustness_results(clean: Mapping[str, Any], perturbed: Sequence[Mapping[str, Any]],
                       perturbations: Sequence[Perturbation]) -> dict[str, Any]:
    """results.json "robustness": per set, per kind, rows [clean, strength 1, ...]
    of the set's average over generators (the paper's Avg row) for SWEEP_COLUMNS.

    clean: results["sets"] of the clean run; perturbed: the perturbed prediction rows."""
    grouped: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in perturbed:
        grouped.setdefault((r["set"], r["perturbation"]), []).append(r)
    keys = [k for k, _, _ in SWEEP_COLUMNS]
    out: dict[str, Any] = {}
    for set_name, metrics in clean.items():
        kinds = {}
        for kind, members in by_kind(perturbations).items():
            rows = [{"perturbation": CLEAN, "strength": None, **{k: metrics["average"].get(k) for k in keys}}]
            for p in members:
                members_p = grouped.get((set_name, p.name))
                avg = set_metrics(members_p)["average"] if members_p else {}
                rows.append({"perturbation": p.name, "strength": p.strength, **{k: avg.get(k) for k in keys}})
            kinds[kind] = rows
        out[set_name] = kinds
    return out


def robustness_markdown(robustness: Mapping[str, Any]) -> list[str]:
    """results.md lines: one table per set and perturbation kind, the clean run first."""
    if not robustness:
        return []
    lines = ["## Robustness", "",
             "Each table scores the same images clean (row 0) and under one perturbation at each strength "
             "(pipeline/evaluation/perturbations.py); metrics are the average over the set's generators.", ""]
    for set_name, kinds in robustness.items():
        for kind, rows in kinds.items():
            lines += [f"**{set_name}: {kind}** ({STRENGTH_NAMES[kind]})", "",
                      "| Perturbation | " + " | ".join(h for _, h, _ in SWEEP_COLUMNS) + " |",
                      "|---|" + "---:|" * len(SWEEP_COLUMNS)]
            for r in rows:
                lines.append(f"| {r['perturbation']} | "
                             + " | ".join(format_value(r[k], fmt) for k, _, fmt in SWEEP_COLUMNS) + " |")
            lines.append("")
    return lines
