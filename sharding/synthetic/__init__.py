"""Synthetic MMFR: a small dataset in exactly the released MMFR layout.

`python -m sharding.synthetic --out DIR --train-images N
--eval-images-per-generator M --seed S` writes it (see `--help`);
`generate_mmfr(...)` does the same from Python and returns a
`SyntheticSummary`. Fakes carry generator-specific, learnable traces (see
`styles.py`), reals look like JPEG photographs, and the reasoning texts use the
ten MMFR attribute names, so the whole pipeline can be exercised end to end on
a laptop.
"""
from sharding.synthetic.generate import (
    SyntheticConfig,
    SyntheticSummary,
    generate_from_config,
    generate_mmfr,
    plan_jobs,
)

__all__ = ["SyntheticConfig", "SyntheticSummary", "generate_from_config", "generate_mmfr", "plan_jobs"]
