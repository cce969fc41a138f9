"""`python -m pipeline.evaluation` / `deepspeed --module pipeline.evaluation`: see cli.py."""
import sys

from pipeline.evaluation.cli import main

sys.exit(main())
