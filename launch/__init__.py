"""Checkout-only entry scripts and the helpers that run them locally.

Not installed with the wheel: `pipeline`, `modeling` and `sharding` are the
runtime packages (with console commands and `python -m` modules). This folder
holds what a checkout adds on top: `train.py` / `eval.py` (thin shims for
`deepspeed launch/train.py ...`), the shell launchers, the demo, and the local
helpers that the demo, the benchmarks and the tests share (`local_run`:
start training through the real `deepspeed` launcher on this machine;
`tiny_models`: tiny models and a tiny evaluation setup built from configs;
`wandb_readback`: read offline W&B runs back with wandb's CLI).
"""
