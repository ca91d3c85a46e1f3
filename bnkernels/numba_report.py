"""Compile the numba-cuda backend's kernels ahead of time and inspect their
machine code, as :mod:`bnkernels.kernel_report` does for the CuPy kernels.

No GPU is needed. For each architecture (``sm_80``, ``sm_90``, ...) and each
kernel specialization of :func:`bnkernels.backends.numba_cuda.kernels.compile_targets`
this

1. compiles the kernel's Python function to PTX with
   ``numba.cuda.compile_ptx(py_func, argument_types, cc=...)``: the PTX the
   dispatcher builds at run time on a device of that compute capability for
   arguments of those types (same NVVM optimization level; the kernels use
   no ``fastmath``/``lineinfo``, nor does this);
2. assembles it with ``ptxas -arch=sm_XX -v`` (:func:`bnkernels.ptxas.assemble_cubin`)
   into a cubin, reading registers, shared memory, stack and spills from
   ptxas' report. At run time the driver JIT-compiles the same PTX with its
   own ptxas, which may be of another CUDA release than the one here;
3. disassembles the cubin with ``cuobjdump -sass``
   (:func:`bnkernels.kernel_report.disassemble`) and counts memory
   instructions (:func:`bnkernels.kernel_report.build_reports`), so each
   kernel gets the same :class:`~bnkernels.kernel_report.KernelReport` as
   a CuPy one, with ``backend == "numba-cuda"`` and the name expression
   ``"<kernel>[<storage dtype>]"``, e.g. ``"stats_planes[float16]"``
   (``[bfloat16]``: the kernels on int16 arrays of bfloat16 bits).

PTX is compiled once per (kernel, storage, architecture) in a process
(2-5 s each with numba-cuda 0.30, mostly Numba's typing and lowering,
which :func:`compile_all` does once for all the architectures asked for:
from sm_75 on they lower alike), by :func:`compile_all` in as many worker
processes as there are CPUs.

Needs numba-cuda (not the simulator: ``NUMBA_ENABLE_CUDASIM`` unset), a
ptxas that accepts numba-cuda's PTX version (``pip install "cuda-toolkit[nvcc]"``)
and cuobjdump/nvdisasm (``pip install "cuda-toolkit[cuobjdump,nvdisasm]"``).
:func:`missing` says which of them is absent.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from typing import NamedTuple

from . import kernel_report as kr
from . import ptxas

BACKEND = "numba-cuda"


class Target(NamedTuple):
    """One kernel specialization (see ``compile_targets``)."""

    kernel: str  # e.g. "stats_planes"
    storage: str  # storage dtype name, e.g. "float16"
    func: object  # the kernel's Python function
    argtypes: tuple  # numba types of its arguments

    @property
    def name_expression(self) -> str:
        return f"{self.kernel}[{self.storage}]"


def _numba_cuda_missing() -> str | None:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "NUMBA_ENABLE_CUDASIM=1: the CUDA simulator compiles no PTX"
    try:
        from numba import cuda

        cuda.compile_ptx  # noqa: B018  (absent from very old numba)
        from .backends.numba_cuda import kernels  # noqa: F401
    except Exception as exc:  # not installed, or broken
        return f'numba-cuda is not usable here ({exc}): pip install "bnkernels[numba-cuda]"'
    return None


def missing() -> str | None:
    """Why the numba-cuda kernels cannot be inspected here (numba-cuda,
    ptxas or cuobjdump/nvdisasm absent, or the simulator on), or None."""
    reason = _numba_cuda_missing()
    if reason:
        return reason
    if ptxas.find_ptxas() is None:
        return f"ptxas not found: {ptxas.PTXAS_INSTALL}"
    try:
        kr.find_cuobjdump()
    except kr.KernelToolError as exc:
        return str(exc)
    return None


@functools.cache
def targets() -> tuple[Target, ...]:
    """Every specialization the backend launches, in ``compile_targets`` order."""
    from .backends.numba_cuda.kernels import compile_targets

    return tuple(Target(*t) for t in compile_targets())


def _cc(arch: str) -> tuple[int, int]:
    digits = kr.normalize_arch(arch)[3:].rstrip("abcdefghijklmnopqrstuvwxyz")
    return int(digits[:-1]), int(digits[-1])


_PTX: dict[tuple[int, str], str] = {}


#: From this compute capability on, numba-cuda lowers a kernel to the same
#: LLVM IR whatever the architecture (its only architecture-dependent
#: lowerings: float64 atomic add from 6.0, fastmath tanh from 7.5), so the
#: IR of one such architecture serves all: only NVVM runs per architecture.
_SAME_LOWERING_FROM = (7, 5)


def _lowered(target: Target, cc):
    """numba-cuda's code library of ``target`` (typed and lowered for
    ``cc``), as ``cuda.compile_ptx`` builds it before NVVM (its own
    internal step: None where this numba-cuda has another)."""
    try:
        from numba.cuda import compiler

        lib, _ = compiler._compile_pyfunc_with_fixup(
            target.func, target.argtypes, debug=None, lineinfo=False, device=False, fastmath=False, cc=cc,
            opt=None, abi="numba", abi_info=None, forceinline=False, launch_bounds=None, lto=False)
        return lib
    except (AttributeError, TypeError):
        return None


def _compile_ptx(index: int, archs) -> list[str]:
    """The PTX of target ``index`` for each of ``archs``: what
    ``cuda.compile_ptx(func, argtypes, cc=...)`` gives for each, typing and
    lowering once for all architectures that lower alike (Numba's typing and
    lowering take about 90 % of a compile), NVVM once per architecture.
    The PTX is then the same instruction for instruction; only the kernel's
    mangled symbol (which digests the compile flags, the compute capability
    among them) is that of the first such architecture."""
    from numba import cuda

    target = targets()[index]
    ccs = [_cc(a) for a in archs]
    shared = [cc for cc in ccs if cc >= _SAME_LOWERING_FROM]
    lib = _lowered(target, shared[0]) if len(shared) > 1 else None
    texts = []
    for cc in ccs:
        if lib is not None and cc in shared:
            (text,) = lib.get_asm_strs(cc=cc)
        else:
            text, _ = cuda.compile_ptx(target.func, target.argtypes, cc=cc)
        texts.append(text)
    return texts


def ptx(target: Target, arch: str) -> str:
    """The PTX of ``target`` for ``arch``, compiled once per process."""
    arch = kr.normalize_arch(arch)
    key = (targets().index(target), arch)
    if key not in _PTX:
        (_PTX[key],) = _compile_ptx(key[0], [arch])
    return _PTX[key]


def _serve(jobs: str) -> None:
    """A worker of :func:`compile_all`: ``jobs``, ``[[index, [arch, ...]], ...]``
    as JSON; writes ``[[ptx per arch], ...]`` as JSON to stdout."""
    json.dump([_compile_ptx(index, archs) for index, archs in json.loads(jobs)], sys.stdout)


def compile_all(archs, workers: int | None = None) -> None:
    """Compile the PTX of every target for each of ``archs`` that is not
    compiled yet, in up to ``workers`` (default: the CPUs this process may
    use) Python processes at once: Numba compiles one kernel at a time,
    a few seconds each. Worker processes are plain ``python -c`` (not
    multiprocessing, which would run ``python -m bnkernels`` again in each)."""
    archs = list(dict.fromkeys(kr.normalize_arch(a) for a in archs))
    jobs = [[i, [a for a in archs if (i, a) not in _PTX]] for i in range(len(targets()))]
    jobs = [job for job in jobs if job[1]]  # per target, its missing architectures (one lowering)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(workers, len(jobs) // 4))  # a worker's start (imports) costs about one compile
    if workers > 1:
        code = "import sys; from bnkernels.numba_report import _serve; _serve(sys.argv[1])"
        shares = [jobs[w::workers] for w in range(workers)]
        procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(share)], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for share in shares]
        for proc, share in zip(procs, shares):
            out, _ = proc.communicate()  # reads and closes stdout, waits
            if proc.returncode == 0:
                _PTX.update({(i, a): text for (i, job_archs), texts in zip(share, json.loads(out))
                             for a, text in zip(job_archs, texts)})
            # else: compiled again below, in this process, where the error shows
    for i, job_archs in jobs:
        missing_archs = [a for a in job_archs if (i, a) not in _PTX]
        if missing_archs:
            _PTX.update(zip(((i, a) for a in missing_archs), _compile_ptx(i, missing_archs)))


def compile_target(target: Target, arch: str) -> kr.CompiledModule:
    """``target`` as a cubin for ``arch``, as :class:`kernel_report.CompiledModule`
    (``lowered_names`` maps its name expression to its one entry symbol;
    ``log`` is ptxas' report). Raises :class:`kernel_report.KernelCompileError`."""
    arch = kr.normalize_arch(arch)
    tool = ptxas.find_ptxas()
    if tool is None:
        raise kr.KernelToolError(f"ptxas not found: {ptxas.PTXAS_INSTALL}")
    try:
        built = ptxas.assemble_cubin(ptx(target, arch), arch, tool)
    except RuntimeError as exc:
        raise kr.KernelCompileError(f"{target.name_expression}: {exc}", str(exc)) from exc
    if len(built.resources) != 1:
        raise kr.KernelCompileError(f"{target.name_expression}: expected one entry function, ptxas reported "
                                    f"{[r.kernel for r in built.resources]}", built.log)
    return kr.CompiledModule(built.cubin, {target.name_expression: built.resources[0].kernel}, built.log)


@functools.cache
def inspect_with_sass(arch: str = "sm_90") -> tuple[list[kr.KernelReport], list[str]]:
    """One :class:`KernelReport` per numba-cuda kernel specialization for
    ``arch`` (``backend == "numba-cuda"``) and the SASS of each, in the same
    order, computed once per process. Each kernel is its own cubin, and
    their symbols are not unique: Numba mangles a kernel's qualified name
    and argument types, the same for the uint32 and uint64 index variants.
    Raises :class:`kernel_report.KernelToolError` when a tool is missing and
    :class:`kernel_report.KernelCompileError` when a kernel does not build."""
    arch = kr.normalize_arch(arch)
    reason = missing()
    if reason:
        raise kr.KernelToolError(reason)
    compile_all([arch])
    reports, texts = [], []
    for target in targets():
        compiled = compile_target(target, arch)
        sass = kr.disassemble(compiled.cubin)
        reports += kr.build_reports(compiled, sass, arch, backend=BACKEND)
        texts.append(sass)
    return reports, texts


def numba_cuda_version() -> str:
    """The installed numba-cuda's version ("" when unknown)."""
    try:
        from importlib.metadata import version

        return version("numba-cuda")
    except Exception:
        return ""


def numba_cuda_missing() -> str | None:
    """Why numba-cuda itself cannot compile PTX here (not installed, or the
    simulator on), or None; unlike :func:`missing`, tools are not checked."""
    return _numba_cuda_missing()


def ptxas_version() -> str:
    """``"13.0"``-style release of the ptxas that assembles ("" when none)."""
    version = ptxas.release()
    return "%d.%d" % version if version else ""
