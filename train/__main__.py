"""``python -m train`` (see train/cli.py)."""
import sys

from .cli import main

sys.exit(main())
