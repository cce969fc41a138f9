"""`python -m pipeline.inference` = `fakereasoning-predict`; under the launcher
`deepspeed --module pipeline.inference ...` or `torchrun -m pipeline.inference ...`."""
import sys

from pipeline.inference.cli import main

sys.exit(main())
