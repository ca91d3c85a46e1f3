"""Exceptions and warnings raised by bnkernels."""


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here.

    The message says why (package missing, no driver, no device) and what to
    install, e.g. ``pip install "bnkernels[cuda13]"``.
    """


class BackendFallbackWarning(RuntimeWarning):
    """``backend="cuda"`` could not use a GPU and ran on the CPU instead.

    Emitted once per distinct reason. To make the fallback fatal, turn it into
    an error with the standard warnings filter::

        import warnings, bnkernels
        warnings.simplefilter("error", bnkernels.BackendFallbackWarning)

    or ``python -W error::bnkernels.BackendFallbackWarning``.
    """
