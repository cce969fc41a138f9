"""Training: the DeepSpeed engine loop, the LR schedule, checkpoints and resume.

`pipeline.training.run.train(cfg)` runs one job on every rank (its steps: run.py's
docstring); `cli.py` is its command line (`fakereasoning-train`, `python -m
pipeline.training`, and `launch/train.py` in a checkout). The packaged recipes
are in `recipes/`.
"""
