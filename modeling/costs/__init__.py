"""modeling.costs: what a model configuration costs, computed without running it.

Owns the FLOP count of a step (`flops`, which MFU uses), the activation and
state memory arithmetic (`memory`, behind `fakereasoning-train --check --plan`),
the fake-tensor step that checks that arithmetic against a real forward and
backward on the meta device (`fake_step`) and the parameter summary of a
preset (`summary`, `python -m modeling.costs.summary`). It may import the model
modules at the top of `modeling`; nothing imports it from there.
"""
