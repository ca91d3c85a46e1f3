"""The synchronized cases the MPI tests run (``mpi_worker.py``, in each
rank) and check (``test_distributed_mpi.py``, in pytest): one global batch
per case, split along axis 0 in uneven parts, one part per rank."""
from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass

import numpy as np

from helpers import make_input, make_params

#: samples per rank, by the number of ranks: uneven, one rank empty at 3
SIZES = {1: [22], 2: [5, 17], 3: [5, 0, 17]}


@dataclass(frozen=True)
class Case:
    name: str
    backend: str
    dtype: str
    sample: tuple  # one sample's shape
    axis: int
    sizes: dict  # ranks -> samples per rank

    def parts(self, ranks: int) -> list[int]:
        return self.sizes[ranks]

    def data(self, ranks: int):
        """``(x, dy, gamma, beta, running_mean, running_var)`` of the global
        batch, the same on every rank (seeded by the case)."""
        rng = np.random.default_rng(zlib.crc32(self.name.encode()))  # (not hash(): salted per process)
        shape = (sum(self.parts(ranks)), *self.sample)
        C = shape[self.axis]
        x = make_input(shape, self.dtype, rng)
        dy = make_input(shape, self.dtype, rng, mean=0.5)
        gamma, beta = make_params(C, rng)
        return x, dy, gamma, beta, rng.uniform(-1, 1, C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)

    def part(self, a, ranks: int, rank: int):
        lo = sum(self.parts(ranks)[:rank])
        return a[lo:lo + self.parts(ranks)[rank]]


def _cases():
    layouts = {"nchw": ((3, 4, 5), 1), "nhwc": ((4, 5, 3), -1)}
    for backend, (layout, (sample, axis)), dtype in itertools.product(("numpy", "numba"), layouts.items(),
                                                                      ("float32", "float16")):
        yield Case(f"{backend}-{layout}-{dtype}", backend, dtype, sample, axis, SIZES)
    # one value per channel on some ranks (the global batch has more), and C beyond the first capacity (64)
    yield Case("numba-rows-one-per-rank", "numba", "float32", (7,), 1, {1: [2], 2: [1, 1], 3: [1, 0, 1]})
    yield Case("numpy-wide-150-channels", "numpy", "float32", (150,), 1, SIZES)
    yield Case("numba-float64-wide", "numba", "float64", (150, 3), 1, SIZES)


CASES = {c.name: c for c in _cases()}
#: the GPU path (statistics copied to the host, which waits for the stream, then the collective): numba-cuda
#: on device arrays under Numba's CUDA simulator, in real MPI processes
SIMULATED_GPU_CASES = {c.name: c for c in (
    Case("numba-cuda-nchw-float32", "numba-cuda", "float32", (3, 4, 5), 1, SIZES),
    Case("numba-cuda-nhwc-float16", "numba-cuda", "float16", (4, 5, 3), -1, SIZES),
)}
#: the same on a real GPU (``pytest -m gpu``: ci/gpu-check.sh), both GPU backends, ranks sharing the device
GPU_CASES = {**SIMULATED_GPU_CASES, **{c.name: c for c in (
    Case("cupy-nchw-float32", "cupy", "float32", (3, 4, 5), 1, SIZES),
    Case("cupy-nhwc-float16", "cupy", "float16", (4, 5, 3), -1, SIZES),
    Case("cupy-wide-float32", "cupy", "float32", (150, 7), 1, SIZES),
)}}
