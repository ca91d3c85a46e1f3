"""``python -m bnkernels``: the bnkernels command line."""
import sys

from .cli import main

sys.exit(main())
