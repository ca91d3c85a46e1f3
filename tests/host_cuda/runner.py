"""Run the project's unchanged CUDA C++ kernels on the CPU, for tests.

No machine that runs the test suite has a GPU. This module compiles a
``.cu`` file (e.g. ``bnkernels/backends/cupy_backend/kernels/bn_kernels.cu``) with g++ into a shared
library, together with ``cuda_host.h``, a small C++20 runtime that provides
the CUDA built-ins the kernels use (one ``std::thread`` per CUDA thread,
blocks one after another, ``__syncthreads`` as a block barrier, warp
shuffles through a per-warp barrier, atomics), and drives it through ctypes
with NumPy arrays. Design and semantics: the comments of ``cuda_host.h``.

How a test drives a kernel
--------------------------
::

    from host_cuda import runner          # tests/ is on sys.path
    from bnkernels.backends.cupy_backend import sources

    so = runner.build("bnkernels/backends/cupy_backend/kernels/bn_kernels.cu", sources.name_expressions())
    dev = runner.HostDevice()
    x = rng.standard_normal(4 * 3 * 5).astype(np.float32)   # C-contiguous
    y = np.empty_like(x)
    k, scale, shift = (np.ones(3, np.float32) for _ in range(3))
    dev.launch(so, "bn_apply<float, float>", grid=4, block=256,
               args=(x, y, np.int64(x.size), np.int64(3), np.int64(5),
                     k, scale, shift, np.int32(0), np.int32(1)))
    # y now holds what the kernel wrote. With a launch plan of the library:
    dev.run(so, plans.apply(x, y, layout, k, scale, shift, False, True, limits))

The library's ``plans.run_*`` sequences call ``device.run(launch)``; an
adapter object with ``run = lambda launch: dev.run(so, launch)`` (plus its
``alloc``, ``counters``, ``aligned``, ``limits``, ``tuning``) runs them here.

* ``build(kernel_file, name_expressions, tsan=False, defines=())`` returns the
  path of a shared library exporting the kernels named by the *name
  expressions*, exactly the strings CuPy's ``RawModule(name_expressions=...)``
  takes (``get_function`` takes the same string). Builds are cached on disk,
  keyed by a hash of every input (sources of the kernel's folder, harness,
  names, flags, compiler version), under ``$BNHOST_CACHE_DIR`` or
  ``<tempdir>/bnkernels-host-cuda-<uid>``: a second test session reuses them.
  Building all 28 instantiations of ``bnkernels/backends/cupy_backend/kernels/bn_kernels.cu`` takes about
  2 s on 2 cores (1.2 s once the runtime object, shared by all builds with
  the same flags, is cached); a cache hit takes milliseconds. A compile
  error raises ``BuildError`` with g++'s messages.
* ``HostDevice.launch(so, name, grid, block, args)`` launches one kernel.
  ``grid``/``block`` are ints or 1-3 tuples. ``args`` follows the kernel's
  parameter list, checked against the parameter types the build exports:

  - a pointer parameter takes a C-contiguous ``numpy.ndarray`` (the kernel
    gets its data pointer) whose dtype matches the pointee (``__half`` ↔
    float16, ``__nv_bfloat16`` ↔ ml_dtypes' bfloat16; uint8 arrays, ``void*`` and struct pointees such as ``float4*``
    accept any dtype), writeable unless the pointee is ``const``; or
    ``np.uint64(0)`` for a null pointer;
  - a value parameter takes a NumPy scalar of exactly the parameter's type
    (``int`` ↔ ``np.int32``, ``long long`` ↔ ``np.int64``, ``unsigned`` ↔
    ``np.uint32``, ``float`` ↔ ``np.float32``, ``double`` ↔ ``np.float64``,
    ...). Python ints/floats are refused: on the GPU their size would be
    CuPy's choice, so plans should say it.

  A mismatch raises ``TypeError`` before anything runs: such a plan would
  pass garbage to the kernel on a GPU too.
* ``HostDevice.run(so, launch)`` does the same for a launch plan object
  (duck-typed: ``.kernel``, ``.grid``, ``.block``, ``.args``, optional
  ``.shared_mem``), e.g. the library's ``Launch`` dataclass.
* The launch returns when every block has finished. A kernel that misuses
  an intrinsic (``__syncthreads`` not reached by all threads of its block,
  a shuffle whose mask misses the calling lane, ...) raises
  ``KernelError`` after the launch. A deadlock (e.g. a barrier some threads
  never reach while others wait in a shuffle) is diagnosed on stderr and
  ends the process (exit status 134) after ``BNHOST_DEADLOCK_SECONDS``
  (default 10) without progress: stuck threads cannot be recovered, and a
  crashed test run beats a hung one. Out-of-bounds accesses are not checked
  (they may crash the process or corrupt memory).

Data races: ThreadSanitizer
---------------------------
``build(..., tsan=True)`` compiles with ``-fsanitize=thread``. Such a
library cannot be loaded into this (uninstrumented) Python; it runs in a
subprocess with ``libtsan`` preloaded::

    result = runner.tsan_run(so_tsan, launch_plan)        # or tsan_launch(...)
    assert result.clean, result.report   # report: TSAN's text, with source lines

``tsan_run`` pickles the arguments to the subprocess and returns the arrays
as the kernel left them (``result.args``). ``run_tsan(script)`` runs any
Python script that way (``runner`` is importable in it) and returns
``(returncode, stderr)``. ``tsan_available()`` tells whether g++ has libtsan.
With ``halt_on_error=1`` the first race ends the subprocess (exit code 66).

What is and is not checked, briefly: the runtime executes real concurrent
threads, so ordering bugs inside a block (a missing ``__syncthreads``, a
shuffle with the wrong mask) show up as wrong results or, under TSAN, as
races at the kernel's source line. Inter-block races cannot show up (blocks
are sequential), nor can anything about performance or register use;
floating-point results may differ from a GPU in the last bits (no FMA
contraction by g++, rsqrt is correctly rounded here), so compare with
tolerances.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
HEADER = HERE / "cuda_host.h"
HARNESS = HERE / "harness.cpp"

CXX = os.environ.get("CXX", "g++")
BASE_FLAGS = (
    "-std=c++20", "-O1", "-g", "-fPIC", "-pthread",
    # CUDA code type-puns through reinterpret_cast (float4 loads, __half2).
    "-fno-strict-aliasing",
    # One section per variable: the linker script below can then pick the
    # __shared__ statics (function-local .bss._ZZ* of the kernel object).
    "-fdata-sections",
    # Export only the bn_host_* entry points. Otherwise two libraries loaded
    # into one process (two kernel files, or two builds of one) would bind
    # to one another's runtime functions, built-in variables and even
    # __shared__ statics of common template kernels (they are
    # STB_GNU_UNIQUE, unified process-wide by the dynamic linker).
    "-fvisibility=hidden", "-fvisibility-inlines-hidden",
)
# -Wno-tsan: g++ 12 warns that TSAN does not model atomic_thread_fence
# (__threadfence); the harness's atomics are acq_rel for that reason.
TSAN_FLAGS = ("-fsanitize=thread", "-Wno-tsan")

# Gathers the zero-initialised function-local statics of the kernel object
# (i.e. the __shared__ variables) between two symbols, so that the runtime
# can poison them before every block. INSERT BEFORE .bss: the default script
# stays in force, and this rule is matched before .bss's own *(.bss.*).
LINKER_SCRIPT = """\
SECTIONS
{
  bnhost_shared (NOLOAD) : ALIGN(64)
  {
    PROVIDE_HIDDEN(bnhost_shared_begin = .);
    *bnhost_kernels.o(.bss._ZZ*)
    PROVIDE_HIDDEN(bnhost_shared_end = .);
  }
}
INSERT BEFORE .bss;
"""

SOURCE_SUFFIXES = {".cu", ".cuh", ".h", ".hpp", ".hh", ".inc", ".inl", ".c", ".cc", ".cpp"}

TSAN_OPTIONS = "halt_on_error=1 report_signal_unsafe=0 second_deadlock_stack=1"


class BuildError(RuntimeError):
    """g++ failed; the message holds the command and its output."""


class KernelError(RuntimeError):
    """A launch was refused or a kernel thread misused a CUDA intrinsic."""


# --------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------

def canonical_name(name: str) -> str:
    """A name expression with insignificant blanks removed, e.g.
    ``"bn_apply< float,float >"`` -> ``"bn_apply<float,float>"`` (blanks
    between two identifier characters, as in ``unsigned int``, stay)."""
    name = " ".join(name.split())
    return re.sub(r"\s*([^\w\s])\s*", r"\1", name)


_NAME_RE = re.compile(r"^[A-Za-z_:][\w:<>,\s\-\+\*&\(\)\.]*$")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"not a kernel name expression: {name!r}")
    return name


def cache_dir() -> Path:
    env = os.environ.get("BNHOST_CACHE_DIR")
    if env:
        return Path(env)
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"bnkernels-host-cuda-{uid}"


@functools.lru_cache(maxsize=None)
def compiler_version() -> str:
    return subprocess.run([CXX, "--version"], capture_output=True, text=True,
                          check=True).stdout


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        p = p.encode() if isinstance(p, str) else p
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:24]


def _sources_digest(kernel_file: Path) -> str:
    """Hash of the kernel file and every source file next to it (the kernel
    #includes its siblings; nothing outside its folder is tracked)."""
    parts: list[str | bytes] = [str(kernel_file), kernel_file.read_bytes()]
    for f in sorted(kernel_file.parent.iterdir()):
        if f.is_file() and f.suffix in SOURCE_SUFFIXES:
            parts += [f.name, f.read_bytes()]
    return _digest(*parts)


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                         f"{proc.stdout}{proc.stderr}")


def _publish(tmp: Path, final: Path) -> None:
    """Moves a finished build directory into place atomically; if another
    process got there first, keeps theirs (same inputs, same result)."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _runtime_object(flags: tuple[str, ...]) -> Path:
    """cuda_host.h's runtime part compiled once per flag set (it does not
    depend on the kernels)."""
    key = _digest("runtime", compiler_version(), " ".join(flags), HEADER.read_bytes())
    final = cache_dir() / f"runtime-{key}"
    obj = final / "runtime.o"
    if obj.exists():
        return obj
    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"runtime-{key}.", dir=cache_dir()))
    try:
        _run([CXX, *flags, "-DBNHOST_IMPLEMENTATION", "-x", "c++", "-c", str(HEADER),
              "-o", str(tmp / "runtime.o")], cwd=tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, final)
    return obj


def build(kernel_file: str | os.PathLike, name_expressions: Iterable[str], tsan: bool = False,
          defines: Iterable[str] | dict[str, Any] = ()) -> Path:
    """Compiles ``kernel_file`` with the host harness into a shared library
    that exports the kernels named by ``name_expressions``; returns its path.

    ``defines``: extra preprocessor definitions, ``["NAME", "NAME=VALUE"]``
    or ``{"NAME": VALUE}``. ``tsan``: build with ThreadSanitizer (load only
    through ``tsan_run``/``run_tsan``).
    """
    kernel_file = Path(kernel_file).resolve()
    if not kernel_file.is_file():
        raise FileNotFoundError(kernel_file)
    if any(c in str(kernel_file) for c in '"\\\n'):
        raise ValueError(f"unsupported characters in path {kernel_file}")
    if isinstance(name_expressions, str):
        raise TypeError("name_expressions must be a sequence of strings, not one string")
    # Registered in one spelling ("bn_apply<float, float>"), whatever the
    # blanks in the request; launches look names up blank-insensitively.
    names: list[str] = []
    for n in name_expressions:
        c = canonical_name(_check_name(n)).replace(",", ", ")
        if c not in names:
            names.append(c)
    if isinstance(defines, dict):
        defines = [k if v is None else f"{k}={v}" for k, v in defines.items()]
    define_flags = tuple(f"-D{d}" for d in defines)

    flags = BASE_FLAGS + (TSAN_FLAGS if tsan else ())
    registry = "".join(f'BN_KERNEL("{n}", {n})\n' for n in names)
    key = _digest("kernels", compiler_version(), " ".join(flags), " ".join(define_flags),
                  registry, HEADER.read_bytes(), HARNESS.read_bytes(),
                  _sources_digest(kernel_file))
    final = cache_dir() / f"{kernel_file.stem}-{'tsan-' if tsan else ''}{key}"
    so = final / f"{kernel_file.stem}.so"
    if so.exists():
        return so

    runtime = _runtime_object(flags)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=cache_dir()))
    try:
        (tmp / "registry.inc").write_text(registry)
        (tmp / "shared.ld").write_text(LINKER_SCRIPT)
        # The object's name matters: the linker script selects it by name.
        _run([CXX, *flags, *define_flags, f"-I{HERE}",
              f'-DKERNEL_FILE="{kernel_file}"', f'-DKERNEL_REGISTRY="{tmp / "registry.inc"}"',
              "-c", str(HARNESS), "-o", str(tmp / "bnhost_kernels.o")], cwd=tmp)
        _run([CXX, *flags, "-shared", str(tmp / "bnhost_kernels.o"), str(runtime),
              f"-Wl,-T,{tmp / 'shared.ld'}", "-o", str(tmp / so.name)], cwd=tmp)
        (tmp / "build.txt").write_text(
            f"{kernel_file}\n{' '.join(flags + define_flags)}\n{registry}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, final)
    return so


# --------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------

# dtype -> type code of harness.cpp
def _dtype_code(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":  # ml_dtypes' (NumPy has none of its own)
        return "bf16"
    if dtype.kind == "b":
        return "b"
    if dtype.kind in "iuf":
        return f"{dtype.kind}{8 * dtype.itemsize}"
    return f"s{dtype.itemsize}"


_CTYPE_OF_CODE = {
    "b": ctypes.c_bool,
    "i8": ctypes.c_int8, "i16": ctypes.c_int16, "i32": ctypes.c_int32, "i64": ctypes.c_int64,
    "u8": ctypes.c_uint8, "u16": ctypes.c_uint16, "u32": ctypes.c_uint32, "u64": ctypes.c_uint64,
    "f32": ctypes.c_float, "f64": ctypes.c_double,
}

_C_NAME_OF_CODE = {
    "b": "bool", "i8": "signed char", "i16": "short", "i32": "int", "i64": "long long",
    "u8": "unsigned char", "u16": "unsigned short", "u32": "unsigned int",
    "u64": "unsigned long long", "f16": "__half", "bf16": "__nv_bfloat16", "f32": "float", "f64": "double", "v": "void",
}


def describe_code(code: str) -> str:
    """Type code -> C spelling, for messages."""
    if code.startswith("pc:"):
        return f"const {describe_code(code[3:])}*"
    if code.startswith("p:"):
        return f"{describe_code(code[2:])}*"
    if code.startswith("s"):
        return f"<{code[1:]}-byte type>"
    return _C_NAME_OF_CODE.get(code, code)


def _dim3(value: int | Sequence[int], what: str) -> tuple[int, int, int]:
    if isinstance(value, (int, np.integer)):
        value = (int(value),)
    dims = tuple(int(v) for v in value)
    if not 1 <= len(dims) <= 3 or any(d < 1 for d in dims):
        raise ValueError(f"{what} must be 1-3 positive ints, got {value!r}")
    return dims + (1,) * (3 - len(dims))


class _Library:
    def __init__(self, path: Path):
        self.path = path
        self.cdll = ctypes.CDLL(str(path))
        self.cdll.bn_host_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [
            ctypes.POINTER(ctypes.c_void_p)]
        self.cdll.bn_host_launch.restype = ctypes.c_int
        self.cdll.bn_host_last_error.restype = ctypes.c_char_p
        self.cdll.bn_host_kernel_name.argtypes = [ctypes.c_int]
        self.cdll.bn_host_kernel_name.restype = ctypes.c_char_p
        self.cdll.bn_host_kernel_signature.argtypes = [ctypes.c_char_p]
        self.cdll.bn_host_kernel_signature.restype = ctypes.c_char_p
        self.cdll.bn_host_shared_bytes.restype = ctypes.c_ulonglong
        self.signatures: dict[str, list[str]] = {}
        for i in range(self.cdll.bn_host_kernel_count()):
            name = self.cdll.bn_host_kernel_name(i).decode()
            sig = self.cdll.bn_host_kernel_signature(name.encode()).decode()
            self.signatures[name] = sig.split(",") if sig else []
        self.by_canonical = {canonical_name(n): n for n in self.signatures}

    def resolve(self, name: str) -> str:
        found = self.by_canonical.get(canonical_name(name))
        if found is None:
            raise KeyError(f"kernel {name!r} is not in {self.path.name}; it was built with "
                           f"{sorted(self.signatures)} (pass the name to build())")
        return found


def _convert(kernel: str, index: int, code: str, arg: Any) -> ctypes._SimpleCData:
    where = f"{kernel}: argument {index} ({describe_code(code)})"
    if code.startswith("p"):
        pointee = code.split(":", 1)[1]
        if isinstance(arg, np.ndarray):
            if not arg.flags.c_contiguous:
                raise TypeError(f"{where}: array must be C-contiguous")
            if code.startswith("p:") and not arg.flags.writeable:
                raise TypeError(f"{where}: the kernel may write through this pointer; "
                                "the array is read-only")
            dcode = _dtype_code(arg.dtype)
            if not (pointee == dcode or pointee == "v" or pointee.startswith("s")
                    or dcode == "u8"):
                raise TypeError(f"{where}: got a {arg.dtype} array")
            return ctypes.c_void_p(arg.ctypes.data)
        if isinstance(arg, np.uint64) and int(arg) == 0:
            return ctypes.c_void_p(None)
        raise TypeError(f"{where}: expected a numpy array or np.uint64(0) (null), "
                        f"got {type(arg).__name__}")
    if isinstance(arg, np.ndarray) or not isinstance(arg, np.generic):
        raise TypeError(f"{where}: expected a numpy scalar of that type, got "
                        f"{type(arg).__name__}{' ' + str(arg.dtype) if hasattr(arg, 'dtype') else ''}")
    dcode = _dtype_code(arg.dtype)
    if dcode != code:
        raise TypeError(f"{where}: got np.{arg.dtype} (pass np.{_numpy_name(code)})")
    if code in ("f16", "bf16"):
        return ctypes.c_uint16(int(np.asarray(arg).view(np.uint16)))
    ctype = _CTYPE_OF_CODE.get(code)
    if ctype is None:
        raise TypeError(f"{where}: value parameters of this type are not supported")
    return ctype(arg.item())


def _numpy_name(code: str) -> str:
    return {"b": "bool_", "f16": "float16", "bf16": "bfloat16", "f32": "float32", "f64": "float64"}.get(
        code, {"i": "int", "u": "uint"}.get(code[:1], "?") + code[1:])


class HostDevice:
    """Launches kernels of host builds (``build()``) on the CPU.

    Libraries are loaded once per path and kept loaded. Launches of one
    library are serialised by the runtime (its __shared__ memory and built-in
    variables are global); ctypes releases the GIL while a kernel runs.
    """

    def __init__(self) -> None:
        self._libraries: dict[Path, _Library] = {}

    def library(self, so: str | os.PathLike) -> _Library:
        path = Path(so).resolve()
        lib = self._libraries.get(path)
        if lib is None:
            lib = self._libraries[path] = _Library(path)
        return lib

    def kernels(self, so: str | os.PathLike) -> dict[str, str]:
        """Name expression -> C parameter list, of every kernel in ``so``."""
        lib = self.library(so)
        return {n: ", ".join(describe_code(c) for c in sig)
                for n, sig in lib.signatures.items()}

    def shared_bytes(self, so: str | os.PathLike) -> int:
        """Bytes of __shared__ variables the launcher poisons before each block."""
        return int(self.library(so).cdll.bn_host_shared_bytes())

    def launch(self, so: str | os.PathLike, name: str, grid: int | Sequence[int],
               block: int | Sequence[int], args: Sequence[Any], shared_mem: int = 0) -> None:
        lib = self.library(so)
        kernel = lib.resolve(name)
        if shared_mem:
            raise NotImplementedError(
                f"{kernel}: dynamic shared memory ({shared_mem} bytes) is not supported by "
                "the host harness (kernels must use static __shared__ arrays)")
        g, b = _dim3(grid, "grid"), _dim3(block, "block")
        sig = lib.signatures[kernel]
        args = tuple(args)
        if len(args) != len(sig):
            raise TypeError(f"{kernel} takes {len(sig)} arguments "
                            f"({', '.join(describe_code(c) for c in sig)}), got {len(args)}")
        values = [_convert(kernel, i, code, a) for i, (code, a) in enumerate(zip(sig, args))]
        argv = (ctypes.c_void_p * max(1, len(values)))(
            *[ctypes.addressof(v) for v in values])
        rc = lib.cdll.bn_host_launch(kernel.encode(), *g, *b, argv)
        if rc != 0:
            message = (lib.cdll.bn_host_last_error() or b"").decode()
            raise KernelError(f"launch of {kernel} grid {g} block {b} failed ({rc}): {message}")

    def run(self, so: str | os.PathLike, launch: Any) -> None:
        """Launches a plan object: ``.kernel``, ``.grid``, ``.block``, ``.args``
        and optionally ``.shared_mem`` (e.g. the library's ``Launch``)."""
        self.launch(so, launch.kernel, launch.grid, launch.block, launch.args,
                    getattr(launch, "shared_mem", 0))


# --------------------------------------------------------------------------
# ThreadSanitizer
# --------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def tsan_runtime() -> Path | None:
    """libtsan of the compiler, or None (g++ prints the bare name if it has
    none)."""
    try:
        out = subprocess.run([CXX, "-print-file-name=libtsan.so"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(out)
    return path.resolve() if path.is_absolute() and path.exists() else None


def tsan_available() -> bool:
    return tsan_runtime() is not None


def run_tsan(script: str, timeout: float = 300, env: dict[str, str] | None = None,
             tsan_options: str = TSAN_OPTIONS) -> tuple[int, str]:
    """Runs ``python -c script`` with libtsan preloaded (needed to load a
    ``build(tsan=True)`` library into an uninstrumented Python); ``runner``
    is importable in the script. Returns ``(returncode, stderr)``; TSAN's
    reports are in stderr, exit code 66 after the first one."""
    lib = tsan_runtime()
    if lib is None:
        raise RuntimeError(f"{CXX} has no libtsan")
    environ = dict(os.environ)
    environ.update(env or {})
    environ["LD_PRELOAD"] = str(lib)
    environ["TSAN_OPTIONS"] = tsan_options
    environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE)] + [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=environ, timeout=timeout)
    return proc.returncode, proc.stderr


@dataclasses.dataclass
class TsanResult:
    returncode: int
    report: str                   # the subprocess's stderr (TSAN's reports)
    args: tuple | None            # the arguments after the launch (None if it died)

    @property
    def clean(self) -> bool:
        return self.returncode == 0 and "ThreadSanitizer" not in self.report


# Each array argument is placed as it was in the caller: at the same
# address modulo 16 (a misaligned view stays misaligned), with 16 bytes of
# the same heap block before and after it, as a GPU allocation has (the
# kernels' 16-byte vectors may cover values before a tensor's first or
# past its last, never outside the aligned 16 bytes that hold one of its
# values). An array passed twice is placed once.
_TSAN_SCRIPT = """
import pickle
import numpy as np
import runner
with open({path!r}, "rb") as f:
    so, name, grid, block, args, shared_mem, offsets = pickle.load(f)
placed = {{}}
def place(a, mis):
    if id(a) not in placed:
        buf = np.zeros(a.nbytes + 64, np.uint8)
        start = (-buf.ctypes.data) % 16 + 16 + mis
        v = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
        v[...] = a
        placed[id(a)] = v
    return placed[id(a)]
args = tuple(a if m is None else place(a, m) for a, m in zip(args, offsets))
runner.HostDevice().launch(so, name, grid, block, args, shared_mem)
with open({path!r}, "wb") as f:
    pickle.dump(args, f)
"""


def tsan_launch(so: str | os.PathLike, name: str, grid: int | Sequence[int],
                block: int | Sequence[int], args: Sequence[Any], shared_mem: int = 0,
                timeout: float = 300) -> TsanResult:
    """``HostDevice.launch`` of a TSAN build, in a subprocess (see run_tsan)."""
    with tempfile.TemporaryDirectory(prefix="bnhost-tsan-") as d:
        path = Path(d) / "launch.pickle"
        with open(path, "wb") as f:
            offsets = tuple(a.ctypes.data % 16 if isinstance(a, np.ndarray) and a.size else None for a in args)
            pickle.dump((str(so), name, grid, block, tuple(args), shared_mem, offsets), f)
        rc, err = run_tsan(_TSAN_SCRIPT.format(path=str(path)), timeout=timeout)
        after = None
        if rc == 0:
            with open(path, "rb") as f:
                after = tuple(pickle.load(f))
    return TsanResult(rc, err, after)


def tsan_run(so: str | os.PathLike, launch: Any, timeout: float = 300) -> TsanResult:
    """``tsan_launch`` of a plan object (see ``HostDevice.run``)."""
    return tsan_launch(so, launch.kernel, launch.grid, launch.block, launch.args,
                       getattr(launch, "shared_mem", 0), timeout=timeout)


__all__ = [
    "BuildError", "HostDevice", "KernelError", "TsanResult", "build", "cache_dir",
    "canonical_name", "run_tsan", "tsan_available", "tsan_launch", "tsan_run",
]
