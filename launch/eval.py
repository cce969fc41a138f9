"""`deepspeed launch/eval.py ...` from a checkout: the same command as
`python -m pipeline.evaluation` / `fakereasoning-eval` (pipeline/evaluation/cli.py).

    deepspeed --num_gpus 8 launch/eval.py --checkpoint runs/x/export/merged --shards OUT_DIR/eval --out runs/x/eval
"""
import sys

from pipeline.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
