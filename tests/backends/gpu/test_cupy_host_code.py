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


BF16_SCRIPT = textwrap.dedent("""
    import json, sys, types
    import numpy as np
    from bnkernels.bench import standin
    standin.install()
    import cupy

    # a stand-in torch whose CUDA tensors hold stand-in device memory: bfloat16 ones
    # say "<V2" in their array interface (torch's), views reinterpret the same memory
    torch = types.ModuleType("torch")

    class _Dtype:
        def __init__(self, name, np_dtype):
            self.name, self.np = name, np.dtype(np_dtype)

        def __str__(self):
            return "torch." + self.name

    torch.bfloat16, torch.int16, torch.float32 = _Dtype("bfloat16", np.int16), _Dtype("int16", np.int16), \\
        _Dtype("float32", np.float32)
    torch.device = lambda kind, index=None: types.SimpleNamespace(type=kind, index=index)
    torch.cuda = types.SimpleNamespace(current_stream=lambda device=None: types.SimpleNamespace(cuda_stream=77),
                                       is_current_stream_capturing=lambda: False)
    sys.modules["torch"] = torch

    class Tensor:
        __module__ = "torch"

        def __init__(self, a, dtype):
            self._a, self._dtype = a, dtype
            self.shape, self.is_cuda = a.shape, True
            self.device = types.SimpleNamespace(index=a.device.id, type="cuda")

        dtype = property(lambda self: self._dtype)

        @property
        def __cuda_array_interface__(self):
            face = dict(self._a.__cuda_array_interface__)
            if self._dtype is torch.bfloat16:
                face["typestr"] = "<V2"
            return face

        def view(self, dtype):
            return Tensor(self._a, dtype)

        def detach(self):
            return self

        def data_ptr(self):
            return self._a.data.ptr

        def stride(self):
            return tuple(s // self._a.dtype.itemsize for s in self._a.strides)

        def element_size(self):
            return self._a.dtype.itemsize

        def is_contiguous(self):
            return True

        def dim(self):
            return len(self.shape)

    def as_tensor(a, device=None):
        assert isinstance(a, cupy.ndarray) and device.index == a.device.id
        return Tensor(a, torch.int16 if a.dtype == np.int16 else torch.float32)

    torch.as_tensor = as_tensor

    launched = []

    class Named(standin._Kernel):
        def __init__(self, name):
            self.name = name

        def __call__(self, *args, **kwargs):
            launched.append(self.name)
            return super().__call__(*args, **kwargs)

    cupy.RawModule.get_function = lambda self, name: Named(name)
    from bnkernels import bn_backward, bn_forward

    def tensor(shape, dtype):
        a = standin.on_device(cupy.asarray(np.zeros(shape, dtype.np)), 1)
        return Tensor(a, dtype)

    x, z, dy = (tensor((4, 3, 16), torch.bfloat16) for _ in range(3))
    g = tensor((3,), torch.float32)
    out = {}
    y, saved = bn_forward(x, g, g, backend="cupy", residual=z, activation="relu", return_saved=True)
    out["forward"] = launched[:]
    out["y"] = [type(y).__name__, str(y.dtype), list(y.shape), y.device.index]
    launched.clear()
    dx, dgamma, dbeta, dz = bn_backward(dy, x, saved.mean, saved.invstd, g, backend="cupy", activation="relu", y=y,
                                        residual=True)
    out["backward"] = launched[:]
    out["dx"] = [str(dx.dtype), list(dx.shape)]
    out["dz"] = [str(dz.dtype), list(dz.shape)]
    launched.clear()
    for _ in range(3):  # full path, recording + replay, replay
        y = bn_forward(x, g, g, backend="cupy")
    out["replayed"] = launched[:]
    out["replayed_y"] = str(y.dtype)
    print(json.dumps(out))
""")


def test_torch_bfloat16_tensors_run_the_bfloat16_kernels():
    """A torch CUDA bfloat16 tensor (stand-ins): its memory goes to CuPy as
    int16, the launches are the ``__nv_bfloat16`` instantiations (the fused
    residual and relu_backward included), and y, dx and dz come back as
    torch bfloat16 tensors of x's shape; the prepared call (recorded, then
    replayed) too."""
    proc = subprocess.run([sys.executable, "-c", BF16_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    bf = "__nv_bfloat16"
    assert out["forward"] == [f"bn_stats<{bf}, float, float, false>", f"bn_apply_residual<{bf}, float>"]
    assert out["y"] == ["Tensor", "torch.bfloat16", [4, 3, 16], 1]
    assert out["backward"] == [f"bn_relu_backward<{bf}>", f"bn_bwd_reduce<{bf}, float, float, false>",
                               f"bn_dx<{bf}, float>"]
    assert out["dx"] == out["dz"] == ["torch.bfloat16", [4, 3, 16]]
    assert out["replayed"] == [f"bn_stats<{bf}, float, float, false>", f"bn_apply<{bf}, float>"] * 3
    assert out["replayed_y"] == "torch.bfloat16"
