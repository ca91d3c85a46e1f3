"""Where the CUDA C++ sources of the CuPy backend are, and which template
instantiations the backend launches.

The sources live next to this module, in ``kernels/``, and ship inside the
wheel as its package data; they are read through ``importlib.resources`` (so
an installed wheel works).
"""
from __future__ import annotations

import itertools
import pathlib
from importlib import resources

MAIN_FILE = "bn_kernels.cu"

#: C++ type of each storage dtype (by NumPy name; bfloat16: ml_dtypes'),
#: and its accumulation type.
STORAGE = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
ACCUMULATOR = {"__half": "float", "__nv_bfloat16": "float", "float": "float", "double": "double"}
RUNNING = ("float", "double")  # dtypes of per-channel statistics (running, saved)


def source_dir() -> pathlib.Path:
    """Folder of the .cu/.cuh files (inside the installed package)."""
    return pathlib.Path(str(resources.files("bnkernels.backends.cupy_backend.kernels")))


def read_source() -> str:
    """Text of the main kernel file (it #includes the .cuh files next to it)."""
    return (source_dir() / MAIN_FILE).read_text()


def nvrtc_options() -> tuple[str, ...]:
    """Options bnkernels passes to ``cupy.RawModule`` (CuPy adds the
    architecture and its own include paths)."""
    return ("--std=c++17", f"-I{source_dir()}")


def stats_name(t: str, r: str, channels_last: bool) -> str:
    return f"bn_stats<{t}, {ACCUMULATOR[t]}, {r}, {'true' if channels_last else 'false'}>"


def apply_name(t: str) -> str:
    return f"bn_apply<{t}, {ACCUMULATOR[t]}>"


def apply_residual_name(t: str) -> str:
    return f"bn_apply_residual<{t}, {ACCUMULATOR[t]}>"


def relu_backward_name(t: str) -> str:
    return f"bn_relu_backward<{t}>"


def infer_coeffs_name(acc: str, r: str) -> str:
    return f"bn_infer_coeffs<{acc}, {r}>"


def bwd_reduce_name(t: str, s: str, channels_last: bool) -> str:
    """``s``: the C++ type of the saved statistics (float or double)."""
    return f"bn_bwd_reduce<{t}, {ACCUMULATOR[t]}, {s}, {'true' if channels_last else 'false'}>"


def dx_name(t: str) -> str:
    return f"bn_dx<{t}, {ACCUMULATOR[t]}>"


def name_expressions() -> list[str]:
    """Every instantiation the backend may launch (compiled together)."""
    names = []
    for t in STORAGE.values():
        names += [stats_name(t, r, cl) for r, cl in itertools.product(RUNNING, (False, True))]
        names += [apply_name(t), apply_residual_name(t), dx_name(t), relu_backward_name(t)]
        names += [bwd_reduce_name(t, r, cl) for r, cl in itertools.product(RUNNING, (False, True))]
    names += [infer_coeffs_name(acc, r) for acc, r in itertools.product(("float", "double"), RUNNING)]
    return names
