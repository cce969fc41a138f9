"""Training: the DeepSpeed engine loop, the LR schedule, checkpoints and resume.

`pipeline.training.run.train(cfg)` runs one job on every rank; `launch/train.py`
is its command line.
"""
