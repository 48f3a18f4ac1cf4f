"""`python -m promptseg ...` runs the command-line interface."""

import sys

from promptseg.cli import main

sys.exit(main())
