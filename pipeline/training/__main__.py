"""`python -m pipeline.training` / `deepspeed --module pipeline.training`: see cli.py."""
import sys

from pipeline.training.cli import main

sys.exit(main())
