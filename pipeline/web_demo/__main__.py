"""`python -m pipeline.web_demo` = `fakereasoning-demo`."""
import sys

from pipeline.web_demo.cli import main

sys.exit(main())
