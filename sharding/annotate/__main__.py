"""`python -m sharding.annotate` = `fakereasoning-annotate`."""
import sys

from sharding.annotate.cli import main

sys.exit(main())
