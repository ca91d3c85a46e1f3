"""Configuration of the pytest-benchmark suite in ``bench/``.

Timing is off unless asked for. In the normal test run (``pytest``, which
collects ``bench/`` too) every benchmark runs once, untimed, on a tiny
version of its shape and is checked against the float64 reference: a smoke
test, so the suite cannot rot. Timing is on, on the full shapes, when the
command line asks for it with any of ``--benchmark-only``,
``--benchmark-enable``, ``--benchmark-save``, ``--benchmark-autosave``,
``--benchmark-compare``, ``--benchmark-json`` or ``--benchmark-histogram``::

    pytest bench --benchmark-only

This hook runs before pytest-benchmark reads its options (its own
``pytest_configure`` is ``trylast``), so it also overrides a
``--benchmark-disable`` in the project's ``addopts``, which would otherwise
make ``--benchmark-only`` a usage error.
"""
import pytest

#: pytest-benchmark options that only make sense with timing on.
TIMING_OPTIONS = ("benchmark_only", "benchmark_enable", "benchmark_save", "benchmark_autosave",
                  "benchmark_compare", "benchmark_json", "benchmark_histogram")

TIMED = pytest.StashKey[bool]()


def pytest_addoption(parser):
    parser.addoption("--bench-ceiling-mib", type=float, default=None,
                     help="bnkernels bench suite: copy buffer of the bandwidth ceiling in MiB "
                          "(default: as bnkernels bench, twice the last-level cache, at least 256)")


def timing_requested(config) -> bool:
    return any(getattr(config.option, name, None) for name in TIMING_OPTIONS)


def pytest_configure(config):
    if not hasattr(config.option, "benchmark_disable"):  # pytest-benchmark not installed
        config.stash[TIMED] = False
        return
    timed = timing_requested(config)
    config.option.benchmark_disable = not timed
    config.stash[TIMED] = timed


@pytest.fixture(scope="session")
def ceiling_bytes(pytestconfig) -> int | None:
    mib = pytestconfig.getoption("--bench-ceiling-mib")
    return None if mib is None else int(mib * (1 << 20))


@pytest.fixture(scope="session")
def timed(pytestconfig) -> bool:
    """True when the benchmarks are timed (full shapes), False for the
    untimed smoke run (tiny shapes)."""
    return pytestconfig.stash.get(TIMED, False)
