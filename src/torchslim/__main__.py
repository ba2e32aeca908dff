"""`python -m torchslim` runs the CLI."""

import sys

from torchslim.cli import main

sys.exit(main())
