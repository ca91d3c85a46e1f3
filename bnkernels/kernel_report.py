"""Compile the CUDA C++ kernels as CuPy would, and inspect the machine code.

No GPU is needed. For each architecture (``sm_80``, ``sm_90``, ...) this

1. compiles the sources with NVRTC to a cubin, with exactly the options that
   ``cupy.RawModule(code=..., options=..., name_expressions=...)`` hands to
   NVRTC (see :func:`cupy_nvrtc_options`), registering every template
   instantiation as a name expression so that the lowered (mangled) symbol
   of each maps back to its expression;
2. reads ptxas' resource report (registers, shared memory, stack frame,
   spill stores and loads) from NVRTC's program log, parsed by
   :func:`bnkernels.ptxas.parse_report`;
3. disassembles the cubin with ``cuobjdump -sass`` and counts, per kernel,
   global loads and stores by width (16-byte ``LDG.E.128`` /
   ``LDG.E.128.CONSTANT`` / ``STG.E.128`` versus narrower ones) and
   local-memory instructions (``LDL`` / ``STL``).

:func:`inspect` does all three and returns one :class:`KernelReport` per
kernel; ``bnkernels kernels --arch sm_90 [--json]`` prints them, with those
of the numba-cuda kernels (:mod:`bnkernels.numba_report`: PTX from Numba,
assembled by ptxas, the same SASS counts).

What is needed (imported lazily, so importing this module needs nothing):

- NVRTC and its Python binding plus the CUDA headers:
  ``pip install "cuda-bindings==13.*" "cuda-toolkit[nvrtc,cudart]==13.*"``
  (not CuPy's binding: its ``getCUBIN`` returns the cubin one byte short,
  which cuobjdump rejects);
- ``cuobjdump`` and the ``nvdisasm`` it runs for ``-sass``:
  ``pip install "cuda-toolkit[cuobjdump,nvdisasm]==13.*"``.

Both are found in the NVIDIA wheels with ``cuda.pathfinder``, else on PATH.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

from .ptxas import Resources, parse_report

#: pip requirement specifiers, as printed in error messages.
NVRTC_INSTALL = 'pip install "cuda-bindings==13.*" "cuda-toolkit[nvrtc,cudart]==13.*"'
SASS_INSTALL = 'pip install "cuda-toolkit[cuobjdump,nvdisasm]==13.*"'

#: Architectures inspected by default (``bnkernels kernels`` without --arch).
DEFAULT_ARCHS = ("sm_80", "sm_90")

#: Appended to CuPy's options so that NVRTC's log carries ptxas' resource
#: report. It changes what ptxas prints and the command line recorded in the
#: cubin's ``.note.nv.tkinfo``, not the machine code (tests check the SASS).
PTXAS_VERBOSE = "--ptxas-options=-v"


class KernelToolError(RuntimeError):
    """NVRTC, cuobjdump or nvdisasm is missing; the message says what to install."""


class KernelCompileError(RuntimeError):
    """NVRTC rejected the sources. ``log`` is NVRTC's program log, ``options``
    the options it was given."""

    def __init__(self, message: str, log: str = "", options: Sequence[str] = ()):
        super().__init__(message)
        self.log = log
        self.options = tuple(options)


# --------------------------------------------------------------------------
# NVRTC options: what CuPy passes
# --------------------------------------------------------------------------

def normalize_arch(arch: str | int) -> str:
    """``"sm_90"``, ``"90"`` or ``90`` -> ``"sm_90"`` (also ``sm_90a``)."""
    m = re.fullmatch(r"(?:sm_)?(\d{2,3}[a-z]?)", str(arch).strip())
    if not m:
        raise ValueError(f"not a real GPU architecture: {arch!r} (expected e.g. sm_80 or sm_90)")
    return f"sm_{m.group(1)}"


def _nvrtc_max_cc(version: tuple[int, int]) -> int:
    # cupy/cuda/compiler.py, _get_max_compute_capability (CuPy 14.2, l. 193-205)
    major, minor = version
    if major == 12 and minor < 8:
        return 90
    if major == 12 and minor == 8:
        return 120
    return 121


def _cupy_include_dir() -> str | None:
    try:
        import cupy
    except Exception:  # not installed, or broken: no CuPy headers to add
        return None
    return os.path.join(os.path.dirname(os.path.abspath(cupy.__file__)), "_core", "include")


def _cuda_include_dir() -> str | None:
    """CuPy's ``-I<CUDA path>/include``: ``cupy.cuda.get_cuda_path()``; without
    CuPy, the CUDA headers that cuda.pathfinder finds (the cudart wheel's or
    CUDA_PATH/CUDA_HOME's)."""
    try:
        import cupy.cuda

        path = cupy.cuda.get_cuda_path()
        return os.path.join(path, "include") if path else None
    except Exception:
        pass
    try:
        from cuda import pathfinder

        return pathfinder.find_nvidia_header_directory("cudart")
    except Exception:
        return None


def cupy_nvrtc_options(options: Sequence[str], arch: str | int, *,
                       nvrtc_version: tuple[int, int] | None = None,
                       cupy_include: str | None = None,
                       cuda_include: str | None = None) -> tuple[str, ...]:
    """The NVRTC options of ``cupy.RawModule(code=..., options=options)``
    compiling for ``arch``, in CuPy's order (CuPy 14.x, jitify off, none of
    the ``CUPY_*`` compile environment variables set).

    ``cupy._core.core.assemble_cupy_compiler_options`` (``_core/core.pyx``,
    compiled into the wheel), called by ``compile_with_cache`` for every
    RawModule:

    - ``-I<cupy>/_core/include/cupy/_cccl/{cub,thrust,libcudacxx}`` (bundled
      CCCL first), then ``options``, then ``--std=c++17`` unless ``options``
      sets a standard (the default of CuPy 14's RawModule), then
      ``-I<cupy>/_core/include``; for NVRTC 11.x / 12.0-12.1 only, CuPy's
      bundled ``cupy/_cuda/cuda-11|cuda-12`` headers; then
      ``-I<CUDA path>/include``.

    ``cupy/cuda/compiler.py`` (CuPy 14.2):

    - ``-ftz=true`` (``_compile_with_cache_cuda``, l. 667);
    - ``-arch=sm_XX`` (``_compile_using_nvrtc_no_warning`` l. 360-361 via
      ``_get_arch_for_options_for_nvrtc`` l. 222-236: cubin, not PTX, for
      any arch NVRTC supports);
    - ``--device-as-default-execution-space`` (l. 371).

    The include folders default to the installed CuPy's (and the CUDA path
    it detects); without CuPy they are left out, except the CUDA headers
    found by cuda.pathfinder.
    """
    arch = normalize_arch(arch)
    opts = tuple(options)
    if nvrtc_version is None:
        nvrtc_version = _nvrtc().version()
    cc = int(re.match(r"sm_(\d+)", arch).group(1))
    if cc > _nvrtc_max_cc(nvrtc_version):
        raise ValueError(f"{arch}: CuPy would ask NVRTC {nvrtc_version[0]}.{nvrtc_version[1]} for PTX "
                         "(JIT-compiled by the driver), not a cubin; nothing to inspect")
    if cupy_include is None:
        cupy_include = _cupy_include_dir()
    if cuda_include is None:
        cuda_include = _cuda_include_dir()

    out: list[str] = []
    if cupy_include:
        out += [f"-I{cupy_include}/cupy/_cccl/{lib}" for lib in ("cub", "thrust", "libcudacxx")]
    out += opts
    if not any("-std=" in o for o in opts):  # also matches --std=
        out.append("--std=c++17")
    if cupy_include:
        out.append(f"-I{cupy_include}")
        major, minor = nvrtc_version
        bundled = "cuda-11" if major == 11 else "cuda-12" if (major == 12 and minor < 2) else None
        if bundled:
            out.append("-I" + os.path.join(cupy_include, "cupy", "_cuda", bundled))
    if cuda_include:
        out.append(f"-I{cuda_include}")
    out += ["-ftz=true", f"-arch={arch}", "--device-as-default-execution-space"]
    return tuple(out)


# --------------------------------------------------------------------------
# NVRTC: compile to a cubin
# --------------------------------------------------------------------------

class _BindingsNvrtc:
    """NVRTC through ``cuda.bindings.nvrtc`` (cuda-bindings)."""

    def __init__(self, mod):
        self.m = mod

    def _check(self, result, what):
        err = result[0]
        if err != self.m.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"{what}: {err.name}")
        return result[1:]

    def version(self) -> tuple[int, int]:
        major, minor = self._check(self.m.nvrtcVersion(), "nvrtcVersion")
        return int(major), int(minor)

    def _bytes(self, prog, size_fn, get_fn, what) -> bytes:
        (size,) = self._check(size_fn(prog), what)
        buf = b" " * size
        self._check(get_fn(prog, buf), what)
        return buf

    def compile(self, source, prog_name, name_expressions, options):
        m = self.m
        (prog,) = self._check(m.nvrtcCreateProgram(source.encode(), prog_name.encode(), 0, [], []),
                              "nvrtcCreateProgram")
        try:
            for ne in name_expressions:
                self._check(m.nvrtcAddNameExpression(prog, ne.encode()), f"nvrtcAddNameExpression({ne})")
            (err,) = m.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])
            log = self._bytes(prog, m.nvrtcGetProgramLogSize, m.nvrtcGetProgramLog, "log")
            log = log.rstrip(b"\0 ").decode(errors="replace")
            if err != m.nvrtcResult.NVRTC_SUCCESS:
                return None, {}, log
            lowered = {}
            for ne in name_expressions:
                (name,) = self._check(m.nvrtcGetLoweredName(prog, ne.encode()), f"nvrtcGetLoweredName({ne})")
                lowered[ne] = name.decode() if isinstance(name, bytes) else str(name)
            cubin = self._bytes(prog, m.nvrtcGetCUBINSize, m.nvrtcGetCUBIN, "cubin")
            return cubin, lowered, log
        finally:
            m.nvrtcDestroyProgram(prog)


_NVRTC_CACHE: list = []


def _nvrtc() -> _BindingsNvrtc:
    """The NVRTC binding (cuda-bindings), its library loaded. Raises
    :class:`KernelToolError` naming what to install."""
    if _NVRTC_CACHE:
        return _NVRTC_CACHE[0]
    try:
        from cuda.bindings import nvrtc as bindings_nvrtc
    except ImportError as exc:
        raise KernelToolError(f"NVRTC's Python binding is missing ({exc}). "
                              f"To get it: {NVRTC_INSTALL}") from exc
    binding = _BindingsNvrtc(bindings_nvrtc)
    try:
        binding.version()  # loads libnvrtc
    except Exception as exc:
        raise KernelToolError(f"the NVRTC library did not load ({exc}). "
                              f"To get it: {NVRTC_INSTALL}") from exc
    _NVRTC_CACHE.append(binding)
    return binding


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library that compiles."""
    return _nvrtc().version()


class CompiledModule(NamedTuple):
    """What :func:`compile_cubin` returns: unpacks as ``cubin, lowered_names, log``."""

    cubin: bytes
    #: name expression -> lowered (mangled) symbol in the cubin
    lowered_names: dict[str, str]
    #: NVRTC's program log (ptxas' resource report with ``resource_report``)
    log: str


def _read_source(source: str | os.PathLike) -> str:
    if isinstance(source, os.PathLike):
        return Path(source).read_text(encoding="utf-8")
    return source


def compile_options(options: Sequence[str], arch: str | int, *, mirror_cupy: bool = True,
                    resource_report: bool = True) -> tuple[str, ...]:
    """The options :func:`compile_cubin` gives NVRTC for the RawModule
    ``options``: :func:`cupy_nvrtc_options` (or, without ``mirror_cupy``,
    ``options`` + ``-arch=sm_XX``), then :data:`PTXAS_VERBOSE` with
    ``resource_report``."""
    arch = normalize_arch(arch)
    if mirror_cupy:
        opts = cupy_nvrtc_options(options, arch, nvrtc_version=nvrtc_version())
    else:
        opts = tuple(options) + (f"-arch={arch}",)
    return opts + ((PTXAS_VERBOSE,) if resource_report else ())


def compile_cubin(source: str | os.PathLike, name_expressions: Iterable[str],
                  options: Sequence[str], arch: str | int, *,
                  mirror_cupy: bool = True, resource_report: bool = True) -> CompiledModule:
    """Compile CUDA C++ to a cubin for the real architecture ``arch``.

    ``source``: the source text, or a path (``os.PathLike``) to read it from.
    Like CuPy, NVRTC gets it as an in-memory program whose name is a file in
    an empty temporary folder, so quoted ``#include`` s resolve only through
    ``-I`` options, as they will under CuPy. ``name_expressions``: the
    kernels to instantiate (``"bn_apply<float, float>"``); ``options``: the
    options bnkernels passes to ``cupy.RawModule``. With ``mirror_cupy``
    (default) they are completed as CuPy completes them
    (:func:`cupy_nvrtc_options`); otherwise given to NVRTC as they are, plus
    ``-arch=sm_XX``. ``resource_report`` appends :data:`PTXAS_VERBOSE`
    (see :func:`compile_options`).

    Returns a :class:`CompiledModule` ``(cubin, lowered_names, log)``.
    Raises :class:`KernelCompileError` (with NVRTC's log) on a compile error
    and :class:`KernelToolError` when NVRTC is missing.
    """
    arch = normalize_arch(arch)
    text = _read_source(source)
    exprs = list(dict.fromkeys(name_expressions))
    nvrtc = _nvrtc()
    opts = compile_options(options, arch, mirror_cupy=mirror_cupy, resource_report=resource_report)
    stem = Path(source).name if isinstance(source, os.PathLike) else "kern.cu"
    with tempfile.TemporaryDirectory(prefix="bnkernels-nvrtc-") as tmp:
        cubin, lowered, log = nvrtc.compile(text, os.path.join(tmp, stem), exprs, opts)
    if cubin is None:
        raise KernelCompileError(f"NVRTC failed to compile for {arch}:\n{log.strip()}\n"
                                 f"options: {' '.join(opts)}", log, opts)
    return CompiledModule(bytes(cubin), lowered, log)


# --------------------------------------------------------------------------
# SASS: cuobjdump -sass
# --------------------------------------------------------------------------

def _find_tool(name: str) -> str | None:
    try:
        from cuda import pathfinder

        found = pathfinder.find_nvidia_binary_utility(name)
        if found:
            return found
    except Exception:  # cuda-pathfinder missing or cannot search
        pass
    return shutil.which(name)


def find_cuobjdump() -> tuple[str, str]:
    """Paths of ``cuobjdump`` and of the ``nvdisasm`` it needs for ``-sass``
    (the NVIDIA wheels', found with cuda.pathfinder, else PATH's). Raises
    :class:`KernelToolError` naming what to install."""
    cuobjdump, nvdisasm = _find_tool("cuobjdump"), _find_tool("nvdisasm")
    missing = [n for n, p in (("cuobjdump", cuobjdump), ("nvdisasm", nvdisasm)) if p is None]
    if missing:
        raise KernelToolError(f"{' and '.join(missing)} not found (cuobjdump -sass runs nvdisasm). "
                              f"To get them: {SASS_INSTALL}")
    return cuobjdump, nvdisasm


def disassemble(cubin: bytes) -> str:
    """``cuobjdump -sass`` of a cubin, as text."""
    cuobjdump, nvdisasm = find_cuobjdump()
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(nvdisasm) + os.pathsep + env.get("PATH", "")
    with tempfile.TemporaryDirectory(prefix="bnkernels-sass-") as tmp:
        path = os.path.join(tmp, "module.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise KernelToolError(f"cuobjdump -sass failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


@dataclass
class SassCounts:
    """Memory instructions of one function's SASS.

    Global loads/stores (``LDG``/``STG``) are counted by access width in
    bits, read from the modifiers: ``128`` (``LDG.E.128``,
    ``LDG.E.128.CONSTANT``, ``STG.E.128``), ``64``, ``U8``/``S8`` (8),
    ``U16``/``S16`` (16), ``256`` (newer GPUs), none: 32. Only whole modifiers
    count, so cache hints such as ``LTC128B`` are not widths. Local memory:
    ``LDL``/``STL`` (spills, and arrays the compiler could not keep in
    registers). Generic ``LD``/``ST`` (address space unknown to the
    compiler) are counted apart.
    """

    global_loads: Counter = field(default_factory=Counter)
    global_stores: Counter = field(default_factory=Counter)
    local_loads: int = 0
    local_stores: int = 0
    generic_loads: int = 0
    generic_stores: int = 0
    instructions: int = 0


_SASS_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_SASS_INSN = re.compile(r"^\s*/\*[0-9a-fA-F]+\*/\s+(?:@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
_WIDTHS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128, "256": 256}


def _width(modifiers: list[str]) -> int:
    for m in modifiers:
        if m in _WIDTHS:
            return _WIDTHS[m]
    return 32


def parse_sass(text: str) -> dict[str, SassCounts]:
    """Count memory instructions per function in ``cuobjdump -sass`` output;
    keys are the functions' (mangled) symbol names."""
    out: dict[str, SassCounts] = {}
    current: SassCounts | None = None
    for line in text.splitlines():
        if m := _SASS_FUNC.match(line):
            current = out.setdefault(m.group(1), SassCounts())
            continue
        if current is None or not (m := _SASS_INSN.match(line)):
            continue
        op, *mods = m.group(1).split(".")
        current.instructions += 1
        if op == "LDG":
            current.global_loads[_width(mods)] += 1
        elif op == "STG":
            current.global_stores[_width(mods)] += 1
        elif op == "LDL":
            current.local_loads += 1
        elif op == "STL":
            current.local_stores += 1
        elif op == "LD":
            current.generic_loads += 1
        elif op == "ST":
            current.generic_stores += 1
    return out


# --------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelReport:
    """One kernel instantiation compiled for one architecture.

    ``resources`` is ptxas' report (:class:`bnkernels.ptxas.Resources`);
    ``registers``, ``shared_bytes`` (static shared memory per block, not
    counting the 1 KiB the system reserves, which sm_90 cubins add to the
    kernel's shared section), ``stack_bytes`` and ``spill_bytes`` are read
    from it. Counts come from the kernel's SASS: ``vector_loads`` /
    ``vector_stores`` are global accesses of 128 bits or more,
    ``scalar_global_loads`` / ``scalar_global_stores`` the narrower ones,
    ``global_load_widths`` / ``global_store_widths`` all of them by width in
    bits, ``local_loads`` / ``local_stores`` the ``LDL`` / ``STL``.
    """

    name_expression: str
    lowered_name: str
    arch: str
    resources: Resources
    vector_loads: int
    vector_stores: int
    scalar_global_loads: int
    scalar_global_stores: int
    local_loads: int
    local_stores: int
    generic_memory_ops: int
    global_load_widths: dict[int, int]
    global_store_widths: dict[int, int]
    #: whose kernel: ``"cupy"`` (CUDA C++ through NVRTC) or ``"numba-cuda"``
    #: (:mod:`bnkernels.numba_report`)
    backend: str = "cupy"

    @property
    def registers(self) -> int:
        return self.resources.registers

    @property
    def shared_bytes(self) -> int:
        return self.resources.shared_bytes

    @property
    def stack_bytes(self) -> int:
        return self.resources.stack_bytes

    @property
    def spill_bytes(self) -> int:
        """Spill stores + spill loads, bytes."""
        return self.resources.spills

    @property
    def local_memory_ops(self) -> int:
        """``LDL`` + ``STL`` instructions."""
        return self.local_loads + self.local_stores

    @property
    def vectorized(self) -> bool:
        """Has 128-bit global loads and 128-bit global stores."""
        return self.vector_loads > 0 and self.vector_stores > 0

    def to_dict(self) -> dict:
        """Flat JSON-ready dict (what ``bnkernels kernels --json`` prints)."""
        r = self.resources
        return {
            "backend": self.backend,
            "name_expression": self.name_expression,
            "lowered_name": self.lowered_name,
            "arch": self.arch,
            "registers": r.registers,
            "shared_bytes": r.shared_bytes,
            "stack_bytes": r.stack_bytes,
            "spill_store_bytes": r.spill_store_bytes,
            "spill_load_bytes": r.spill_load_bytes,
            "spill_bytes": r.spills,
            "local_memory_ops": self.local_memory_ops,
            "local_loads": self.local_loads,
            "local_stores": self.local_stores,
            "vector_loads": self.vector_loads,
            "vector_stores": self.vector_stores,
            "scalar_global_loads": self.scalar_global_loads,
            "scalar_global_stores": self.scalar_global_stores,
            "generic_memory_ops": self.generic_memory_ops,
            "global_load_widths": {str(k): v for k, v in sorted(self.global_load_widths.items())},
            "global_store_widths": {str(k): v for k, v in sorted(self.global_store_widths.items())},
            "vectorized": self.vectorized,
        }


def build_reports(compiled: CompiledModule, sass: str, arch: str, backend: str = "cupy") -> list[KernelReport]:
    """Join ptxas' report (from ``compiled.log``) and the SASS counts into one
    :class:`KernelReport` per kernel (entry function), in name-expression
    order; kernels that are not name expressions (``extern "C"`` ones) follow,
    named by their symbol. ``backend`` names whose kernels they are."""
    arch = normalize_arch(arch)
    resources = {r.kernel: r for r in parse_report(compiled.log)}
    if not resources:
        raise RuntimeError("no ptxas resource report in NVRTC's log; compile with resource_report=True")
    counts = parse_sass(sass)
    by_symbol = {sym: ne for ne, sym in compiled.lowered_names.items()}
    ordered = list(dict.fromkeys([*compiled.lowered_names.values(), *resources]))
    reports = []
    for sym in ordered:
        if sym not in resources:
            raise RuntimeError(f"no ptxas report for {sym} ({by_symbol.get(sym, sym)})")
        c = counts.get(sym)
        if c is None:
            raise RuntimeError(f"{sym} ({by_symbol.get(sym, sym)}) is not in cuobjdump's SASS")
        wide = lambda widths, keep: sum(n for w, n in widths.items() if (w >= 128) == keep)  # noqa: E731
        reports.append(KernelReport(
            name_expression=by_symbol.get(sym, sym), lowered_name=sym, arch=arch,
            resources=resources[sym],
            vector_loads=wide(c.global_loads, True), vector_stores=wide(c.global_stores, True),
            scalar_global_loads=wide(c.global_loads, False),
            scalar_global_stores=wide(c.global_stores, False),
            local_loads=c.local_loads, local_stores=c.local_stores,
            generic_memory_ops=c.generic_loads + c.generic_stores,
            global_load_widths=dict(c.global_loads), global_store_widths=dict(c.global_stores),
            backend=backend,
        ))
    return reports


class KernelSources(NamedTuple):
    """The CuPy backend's sources: what :func:`inspect` compiles by default."""

    source: Path
    name_expressions: list[str]
    options: tuple[str, ...]


def bnkernels_sources() -> KernelSources:
    """The main ``.cu`` file, name expressions and RawModule options
    (``nvrtc_options()``) of :mod:`bnkernels.backends.cupy_backend.sources`."""
    try:
        from .backends.cupy_backend import sources
    except ImportError as exc:
        raise KernelToolError(f"the CuPy backend's kernel sources are not in this bnkernels: {exc}") from exc
    options = sources.nvrtc_options()
    return KernelSources(Path(sources.source_dir()) / sources.MAIN_FILE,
                         list(sources.name_expressions()), tuple(options))


def inspect(arch: str | int = "sm_90", source: str | os.PathLike | None = None,
            name_expressions: Iterable[str] | None = None,
            options: Sequence[str] | None = None, *, mirror_cupy: bool = True) -> list[KernelReport]:
    """Compile for ``arch`` and report every kernel: resources from ptxas,
    memory instructions from the SASS.

    Without ``source`` (and ``name_expressions``, ``options``), inspects
    bnkernels' own CuPy kernels (:func:`bnkernels_sources`). Raises
    :class:`KernelCompileError` or :class:`KernelToolError`.
    """
    return inspect_with_sass(arch, source, name_expressions, options, mirror_cupy=mirror_cupy)[0]


#: bnkernels' own builds by (source, name expressions, options, arch).
_OWN_BUILDS: dict = {}


def own_build(arch: str | int = "sm_90") -> CompiledModule:
    """bnkernels' own CuPy kernels (:func:`bnkernels_sources`) compiled
    for ``arch`` as :func:`compile_cubin` does, once per process and
    architecture (NVRTC takes most of a minute for them): the command and
    the tests share it. NVRTC is still looked up on every call, so that its
    absence is always reported."""
    src = bnkernels_sources()
    key = (str(src.source), tuple(src.name_expressions), tuple(src.options), normalize_arch(arch))
    if key in _OWN_BUILDS:
        _nvrtc()
    else:
        _OWN_BUILDS[key] = compile_cubin(src.source, src.name_expressions, src.options, arch)
    return _OWN_BUILDS[key]


def inspect_with_sass(arch: str | int = "sm_90", source: str | os.PathLike | None = None,
                      name_expressions: Iterable[str] | None = None, options: Sequence[str] | None = None, *,
                      mirror_cupy: bool = True) -> tuple[list[KernelReport], str]:
    """:func:`inspect`, and the SASS text it read (for ``sass_loops``)."""
    if source is None and name_expressions is None and options is None and mirror_cupy:
        compiled = own_build(arch)
    else:
        if source is None:
            src = bnkernels_sources()
            source = src.source
            name_expressions = src.name_expressions if name_expressions is None else name_expressions
            options = src.options if options is None else options
        compiled = compile_cubin(source, name_expressions or (), options or (), arch,
                                 mirror_cupy=mirror_cupy, resource_report=True)
    sass = disassemble(compiled.cubin)
    return build_reports(compiled, sass, arch), sass
