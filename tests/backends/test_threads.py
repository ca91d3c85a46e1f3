"""Calls from several Python threads at once, on each of Numba's threading
layers that installs here: results equal to one thread's, and no abort
(``workqueue`` is not thread-safe; the numba backend takes turns there).

Each layer runs in a fresh interpreter: Numba picks its layer once per
process (``NUMBA_THREADING_LAYER``), and an abort must fail the test, not
kill the test run.
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba")

LAYERS = ["workqueue", "omp", "tbb"]

SCRIPT = textwrap.dedent("""
    import sys, threading
    import numpy as np
    import numba
    from bnkernels import bn_backward, bn_forward, channel_stats

    rng = np.random.default_rng(0)
    cases = [(rng.standard_normal(shape).astype(np.float32) + 3, axis)
             for shape, axis in [((16, 32, 9, 9), 1), ((64, 9, 9, 16), -1), ((512, 24), 1), ((8, 3, 40, 40), 1)]]

    def run(x, axis):
        rm, rv = np.zeros(x.shape[axis], np.float32), np.ones(x.shape[axis], np.float32)
        y, saved = bn_forward(x, None, None, rm, rv, axis=axis, backend="numba", return_saved=True)
        dx = bn_backward(y, x, saved.mean, saved.invstd, axis=axis, backend="numba")[0]
        yi = bn_forward(x, None, None, rm, rv, training=False, axis=axis, backend="numba")
        return y, dx, yi, rm, rv, channel_stats(x, axis=axis, backend="numba").m2

    expected = [run(x, axis) for x, axis in cases]   # one thread (this also picks the layer)
    failures = []

    def worker(t):
        for i in range(12):
            x, axis = cases[(t + i) % len(cases)]
            got = run(x, axis)
            for g, e in zip(got, expected[(t + i) % len(cases)]):
                if not np.array_equal(g, e):
                    failures.append((t, i))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failures, failures
    print("layer", numba.threading_layer(), "OK")
""")


def _layer_loads(layer, env) -> bool:
    probe = ("import numba, numpy as np\n"
             "@numba.njit(parallel=True)\n"
             "def f(a):\n    return a.sum()\n"
             "f(np.ones(4))\nprint(numba.threading_layer())")
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode == 0 and proc.stdout.strip() == layer


@pytest.mark.parametrize("layer", LAYERS)
def test_four_threads_on_each_threading_layer(layer, tmp_path):
    env = {**os.environ, "NUMBA_THREADING_LAYER": layer, "NUMBA_NUM_THREADS": "2",
           # pip's tbb puts libtbb.so.12 in the environment's lib/, which Numba's TBB pool links to
           "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [os.path.join(sys.prefix, "lib"),
                                                            os.environ.get("LD_LIBRARY_PATH")]))}
    if not _layer_loads(layer, env):
        if os.environ.get("CI"):
            pytest.fail(f"Numba's {layer} threading layer does not load in CI (ci/test.sh installs tbb)")
        pytest.skip(f"Numba's {layer} threading layer is not installed here")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert f"layer {layer} OK" in proc.stdout
