"""The benchmark harness behind ``bnkernels bench`` and the pytest-benchmark
suite in ``bench/``: what is timed, on what, how, and against which ceiling.

Only NumPy and the standard library are needed; PyTorch, CuPy and
matplotlib are imported when asked for and their absence is reported,
never fatal at import. One module per job:

- :mod:`.operations`: each operation described once (title, bytes moved,
  float64 reference, how bnkernels, the textbook code and torch run it);
- :mod:`.ops`: shapes, inputs, the correctness check against the reference;
- :mod:`.implementations`: the candidates and peers (bnkernels backends,
  textbook NumPy/CuPy, torch) and the catalog of what runs here;
- :mod:`.timing`: timers, repeats, the cache-cold rotation;
- :mod:`.machine`: caches, memory, the copy ceiling and the same-size copy,
  the CPU and CUDA devices, system information;
- :mod:`.run`: checking and timing everything, derived figures;
- :mod:`.plot`: the chart.

Everything is re-exported here (``from bnkernels import bench as bm``).
"""
from .operations import *  # noqa: F401,F403
from .ops import *  # noqa: F401,F403
from .implementations import *  # noqa: F401,F403
from .timing import *  # noqa: F401,F403
from .machine import *  # noqa: F401,F403
from .run import *  # noqa: F401,F403
from .plot import *  # noqa: F401,F403
