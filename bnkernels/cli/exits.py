"""Exit codes of the ``bnkernels`` command."""
from __future__ import annotations


EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
