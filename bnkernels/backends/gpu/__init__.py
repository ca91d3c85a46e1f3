"""What both GPU backends share: launch geometry (``geometry``), the launch
sequence of every stage with its workspace and edge cases (``plans``), the
counters of the last-block merge (``counters``) and the ``interface.Backend``
members (``members``). Plain Python; nothing here imports a GPU package."""
