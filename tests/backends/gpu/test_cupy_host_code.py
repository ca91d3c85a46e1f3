"""The cupy backend's host code on a stand-in CuPy whose kernels do
nothing (``bnkernels/bench/standin.py``): where each launch runs (the
array's device, not CuPy's current one; torch's current stream for torch
tensors) and how big its grid is (the compiled kernel's occupancy),
through the full path, the first replay's recording and a replay. In a
process of its own, since the stand-in replaces CuPy there (and a
stand-in torch tensor, whose module says torch, stands for a CUDA one)."""
import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba")  # the stand-ins replace numba.cuda too

SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    from bnkernels.bench import standin
    standin.install()
    import cupy
    from bnkernels import bn_backward, bn_forward

    standin.RECORD_LAUNCHES = True
    x = standin.on_device(cupy.asarray(np.ones((32, 64, 56, 56), np.float16)), 1)
    g = standin.on_device(cupy.asarray(np.ones(64, np.float32)), 1)
    out = {}
    for name, call in [("forward", lambda: bn_forward(x, g, g, backend="cupy", return_saved=True)),
                       ("backward", lambda: bn_backward(x, x, saved.mean, saved.invstd, g, backend="cupy"))]:
        standin.LAUNCHES.clear()
        for _ in range(3):  # full path, recording + replay, replay
            result = call()
        if name == "forward":
            saved = result[1]
            out["result_device"] = result[0].device.id
        out[name] = [(dev, list(grid), list(block)) for dev, _, grid, block in standin.LAUNCHES]
        out["current_after"] = cupy.cuda.runtime.getDevice()

    # torch: a CUDA tensor on device 1 (its memory: a stand-in array's), torch's current stream 77
    import sys, types
    torch = types.ModuleType("torch")
    torch.cuda = types.SimpleNamespace(current_stream=lambda device=None: types.SimpleNamespace(cuda_stream=77),
                                       is_current_stream_capturing=lambda: False)
    sys.modules["torch"] = torch

    class Tensor:
        __module__ = "torch"

        def __init__(self, a):
            self._a = a
            self.shape, self.dtype, self.is_cuda = a.shape, "torch." + a.dtype.name, True
            self.device = types.SimpleNamespace(index=1, type="cuda")
            self.__cuda_array_interface__ = a.__cuda_array_interface__

        def data_ptr(self):
            return self._a.data.ptr

        def stride(self):
            return tuple(s // self._a.dtype.itemsize for s in self._a.strides)

        def element_size(self):
            return self._a.dtype.itemsize

        def is_contiguous(self):
            return True

    t, tg = Tensor(x), Tensor(g)
    standin.LAUNCHES.clear()
    for _ in range(3):
        bn_forward(t, tg, tg, backend="cupy")
    out["torch"] = [(dev, stream) for dev, stream, _, _ in standin.LAUNCHES]
    out["stream_after"] = cupy.cuda.get_current_stream().ptr

    # CUDA-graph capture: the counters (bn_stats' last argument) of each call
    from bnkernels.backends import cupy_backend
    x0 = cupy.asarray(np.ones((8, 3, 5), np.float32))
    counters = {}
    for phase, capturing in [("eager", False), ("captured", True), ("eager again", False)]:
        standin.CAPTURING[0] = capturing
        standin.LAUNCHES.clear()
        launched = []
        run = standin._Kernel.__call__
        standin._Kernel.__call__ = lambda self, grid, block, args, **kw: launched.append(args) or run(self, grid, block, args, **kw)
        for _ in range(3):
            bn_forward(x0, backend="cupy")
        standin._Kernel.__call__ = run
        counters[phase] = [args[-1].data.ptr for args in launched if len(args) == 23]  # bn_stats' 23 arguments
    out["counters"] = counters
    out["kept"] = len(cupy_backend.CAPTURED)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def launches():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_every_launch_runs_on_the_arrays_device(launches):
    for op in ("forward", "backward"):
        assert len(launches[op]) == 6  # 2 kernels x 3 calls
        assert {dev for dev, _, _ in launches[op]} == {1}, launches[op]
    assert launches["current_after"] == 0  # and the caller's current device is restored
    assert launches["result_device"] == 1


def test_grids_are_sized_by_the_compiled_kernels_occupancy(launches):
    """The stand-in's kernels report 40 registers and 12292 bytes of shared
    memory: 6 resident blocks of 256 threads per SM (not 8, by threads
    alone), so the elementwise grid is 2 waves x 132 SMs x 6."""
    for op in ("forward", "backward"):
        grids = {tuple(grid) for _, grid, block in launches[op] if block == [256, 1, 1]}
        assert grids == {(2 * 132 * 6, 1, 1)}, launches[op]
    # the reduction: 64 channel planes of 100352 values, 1 channel per block:
    # ceil(2 * 132 * 6 / 64) = 25 splits (by work: 100352 / (256 * 16) = 25 as well)
    assert {tuple(grid) for _, grid, block in launches["forward"] if block == [1, 256, 1]} == {(25, 64, 1)}


def test_torch_tensors_run_on_torchs_current_stream(launches):
    """Full path, recording and replay alike: on torch's stream (77) and the
    tensor's device, CuPy's own current stream untouched afterwards."""
    assert launches["torch"] == [[1, 77]] * 6
    assert launches["stream_after"] == 0


def test_calls_captured_into_cuda_graphs_own_their_counters_and_workspace(launches):
    """While the stream is captured, each call gets counters (and a
    workspace) of its own, kept alive for the graph; eager calls before and
    after share the stream's."""
    c = launches["counters"]
    assert len(c["eager"]) == len(c["captured"]) == len(c["eager again"]) == 3
    assert len(set(c["eager"] + c["eager again"])) == 1
    assert len(set(c["captured"])) == 3 and not set(c["captured"]) & set(c["eager"])
    assert launches["kept"] >= 3 * (1 + 5 + 3)  # per captured call: counters, 5 workspace vectors, 3 stages
