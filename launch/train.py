"""`deepspeed launch/train.py ...` from a checkout: the same command as
`python -m pipeline.training` / `fakereasoning-train` (pipeline/training/cli.py).

    deepspeed --num_gpus 8 launch/train.py --config fakereasoning-13b
    deepspeed --num_gpus 2 launch/train.py --config launch/recipes/tiny-cpu.yaml data.train_shards=DIR
"""
import sys

from pipeline.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
