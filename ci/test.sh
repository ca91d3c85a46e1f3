#!/usr/bin/env bash
# Install the test dependencies into ./.venv and run the whole test suite.
# This is the test command of README.md; .ci/run calls it. Extra arguments go
# to both pytest runs. CPU only: tests marked `gpu` are deselected unless
# BNKERNELS_GPU=1. Exits non-zero when any test failed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# Beyond bnkernels[test]:
# - matplotlib: `bnkernels bench --plot` is tested for real;
# - torch==2.13.0 (CPU): the comparison point of the torch-marked tests;
# - cupy-cuda13x: imports without a GPU, so the "cupy installed, no driver"
#   path of backend selection is tested for real;
# - numba + numba-cuda[cu13] (NVVM, NVRTC): the numba-cuda kernels run under
#   the CUDA simulator and compile to PTX;
# - cuda-toolkit[nvcc,cuobjdump,nvdisasm]: a ptxas as new as that NVVM (the
#   machine's CUDA 13.0 ptxas rejects PTX 9.5) to assemble for sm_80/sm_90
#   and report resources, and cuobjdump/nvdisasm to read the SASS.
# - ml_dtypes: NumPy's bfloat16, so bfloat16 is tested on every backend;
# - keras==3.15.1 (torch backend), jax[cpu], scikit-learn: bnkernels.keras,
#   DLPack with real JAX arrays, and the digits example (examples/) for real;
# - mpi4py + mpich (PyPI): synchronized batch norm on real `mpiexec -n 1/2/3`
#   processes (tests/test_distributed_mpi.py; torch.distributed's gloo needs
#   nothing more);
# - tbb: Numba's TBB threading layer, so that calls from several threads are
#   tested on every layer (tbb, omp, workqueue: tests/backends/test_threads.py).
TEST_EXTRAS=${BNKERNELS_TEST_EXTRAS-"matplotlib torch==2.13.0 cupy-cuda13x numba numba-cuda[cu13] cuda-toolkit[nvcc,cuobjdump,nvdisasm] tbb ml_dtypes keras==3.15.1 jax[cpu]==0.10.2 scikit-learn==1.9.1 mpi4py==4.1.2 mpich==5.0.2"}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
echo "ci/test.sh: installing bnkernels[test] $TEST_EXTRAS into .venv" >&2
# pip prints a warning per unreadable local index entry here; keep errors.
# (pipefail: a failing pip still fails this script.)
.venv/bin/python -m pip install -q -e ".[test]" $TEST_EXTRAS 2>&1 \
  | { grep -v "is ignored: it is neither" || true; } >&2

MARKS="not gpu"
if [ "${BNKERNELS_GPU:-0}" = "1" ]; then MARKS=""; fi

# 1. The GPU kernels executed by Numba's CUDA simulator, in a process of its
#    own (the simulator replaces numba.cuda at import time), started first
#    and run beside step 2 (on a second core: CI's wall time), its output
#    kept in a log printed when it ends.
status=0
sim_pid=""
sim_log=$(mktemp)
if .venv/bin/python -c "import numba.cuda" 2>/dev/null; then
  NUMBA_ENABLE_CUDASIM=1 .venv/bin/python -m pytest tests/cudasim -p no:cacheprovider "$@" >"$sim_log" 2>&1 &
  sim_pid=$!
else
  echo "ci/test.sh: numba-cuda is not installed: simulator tests not run" >&2
fi

# 2. Everything that runs on the CPU as is (NumPy backend, dispatch, CLI,
#    benchmarks as smoke tests, compile checks of the GPU kernels).
.venv/bin/python -m pytest -m "$MARKS" "$@" || status=$?

if [ -n "$sim_pid" ]; then
  sim_status=0
  wait "$sim_pid" || sim_status=$?
  echo "ci/test.sh: the simulator tests (tests/cudasim), run beside the others:"
  cat "$sim_log"
  if [ "$sim_status" != 0 ]; then status=$sim_status; fi
fi
rm -f "$sim_log"

# (The resource report of both GPU backends' kernels, `bnkernels kernels
# --arch sm_90`, is not printed here: the tests above check it for sm_80 and
# sm_90, and printing it would compile every numba-cuda kernel once more in
# a process of its own: minutes of CI time.)
exit $status
