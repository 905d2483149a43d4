"""`python -m mlxcore ...`: the library's commands (see mlxcore/cli.py)."""

import sys

from mlxcore.cli import main

sys.exit(main())
