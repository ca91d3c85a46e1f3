"""Exceptions and warnings raised by bnkernels."""


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here.

    The message says why (package missing, no driver, no device) and what to
    install, e.g. ``pip install "bnkernels[cuda13]"``.
    """


class BackendFallbackWarning(RuntimeWarning):
    """``backend="cuda"`` could not use a GPU and ran on the CPU instead.

    Emitted on every such call; Python's warnings filters decide what is
    shown (by default once per calling line). To make the fallback fatal:

    - set the environment variable ``BNKERNELS_NO_FALLBACK=1``: the call
      raises :class:`BackendUnavailableError` instead;
    - or use the standard filter in code (at any time, also after a first
      fallback)::

          import warnings, bnkernels
          warnings.simplefilter("error", bnkernels.BackendFallbackWarning)

    - or under pytest, ``filterwarnings = ["error::bnkernels.BackendFallbackWarning"]``.

    ``python -W error::bnkernels.BackendFallbackWarning`` (and the same in
    ``PYTHONWARNINGS``) does not work: Python resolves the category at
    start-up, before bnkernels can be imported, and ignores the option. It
    is a ``RuntimeWarning``, so ``python -W error::RuntimeWarning`` works,
    for every runtime warning.
    """


class SyncError(RuntimeError):
    """Ranks of a synchronized call (``comm=``) disagree: on the operation,
    the channel count, the dtype, the training flag or the number of calls
    made, or a rank refused its arguments. Raised on every rank, from the
    same collective, so that no rank hangs waiting for the others."""
