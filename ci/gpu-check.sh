#!/usr/bin/env bash
# The one-command device check, for a machine with an NVIDIA GPU:
#
#   bash ci/gpu-check.sh [OUT_DIR]      (default: $OUT, else ./gpu-check-out)
#
# 1. finds a Python with CuPy, numba-cuda, torch (CUDA) and pytest: the
#    machine's python3 when it has them all (no network needed), else a
#    fresh .venv-gpu with bnkernels[cuda12|cuda13,torch,test,plot] from PyPI,
#    CUDA 12 or 13 chosen from the driver;
# 2. runs every GPU-marked test: the cupy backend through the public API and
#    the numba-cuda suite of tests/cudasim on the real device (that
#    conftest marks them gpu when no simulator is asked for), and, where
#    mpi4py is installed, synchronized batch norm on the GPU backends over
#    MPI (2 ranks) and over NCCL (one rank per GPU): tests/test_distributed_mpi.py;
# 3. runs `bnkernels bench --device gpu` for the named shapes, float32 and
#    float16 (and bfloat16 where ml_dtypes is installed; its bnkernels rows
#    take torch CUDA tensors), against torch-cuda and textbook CuPy, writing bench-gpu.json,
#    bench-gpu.png and bench-gpu.txt;
#    then the training step of a torch BatchNorm layer through autograd
#    (`--ops torch-module`: bnkernels.torch's drop-in on each GPU backend
#    against torch's layer) beside the plain calls, bench-gpu-module.*;
# 4. prints one summary table (GB/s, % of the same-size copy, vs torch).
#
# Exit status: 0 when the tests passed and every bnkernels result was
# right; 1 otherwise; 2 when there is no usable NVIDIA GPU. Budget: under 8
# minutes on an H100 (BNKERNELS_GPU_CHECK_QUICK=1: the bench's --quick).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-check-out}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

if ! nvidia-smi -L >"$OUT_DIR/nvidia-smi.txt" 2>&1; then
  echo "ci/gpu-check.sh: no usable NVIDIA GPU (nvidia-smi -L failed)" >&2
  exit 2
fi
cat "$OUT_DIR/nvidia-smi.txt"

NEEDS='import cupy, numba.cuda, torch, pytest, hypothesis, matplotlib
assert torch.cuda.is_available(), "torch has no CUDA"
assert cupy.cuda.runtime.getDeviceCount() > 0
assert numba.cuda.is_available(), "numba-cuda sees no GPU"'
PY=python3
if "$PY" -c "$NEEDS" 2>/dev/null; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # bnkernels from this checkout
  BNK=("$PY" -m bnkernels)
else
  major=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | cut -d. -f1)
  extra=cuda13; [ "${major:-0}" -lt 580 ] && extra=cuda12  # CUDA 13 needs driver 580+
  echo "ci/gpu-check.sh: installing bnkernels[$extra,torch,test,plot,bf16,mpi] into .venv-gpu" >&2
  python3 -m venv .venv-gpu && .venv-gpu/bin/python -m pip install -q -e ".[$extra,torch,test,plot,bf16,mpi]" || exit 1
  PY=.venv-gpu/bin/python
  "$PY" -c "$NEEDS" || exit 1
  BNK=(.venv-gpu/bin/bnkernels)
fi
"$PY" -c "import bnkernels, cupy, torch, numba_cuda; print('bnkernels', bnkernels.__version__, '| cupy', cupy.__version__, '| torch', torch.__version__, '| numba-cuda', numba_cuda.__version__)" 2>/dev/null \
  || "$PY" -c "import bnkernels, cupy, torch; print('bnkernels', bnkernels.__version__, '| cupy', cupy.__version__, '| torch', torch.__version__)"

status=0
# Never fall back to the CPU: a GPU backend that cannot run is a failure here.
export BNKERNELS_NO_FALLBACK=1

echo "== GPU tests"
"$PY" -m pytest -m gpu tests -q -p no:cacheprovider -x \
  2>&1 | tee "$OUT_DIR/gpu-tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== bench"
quick=(); [ "${BNKERNELS_GPU_CHECK_QUICK:-0}" = 1 ] && quick=(--quick)
dtypes=float32,float16
"$PY" -c "import ml_dtypes" 2>/dev/null && dtypes=$dtypes,bfloat16  # bfloat16 rows where ml_dtypes is there
"${BNK[@]}" bench --device gpu "${quick[@]}" --dtype "$dtypes" --shapes all \
  --backends cupy,numba-cuda,torch-cuda,textbook-cupy \
  --json "$OUT_DIR/bench-gpu.json" --plot "$OUT_DIR/bench-gpu.png" 2>&1 | tee "$OUT_DIR/bench-gpu.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== bench: a torch layer's training step (bnkernels.torch's BatchNorm against torch's)"
"${BNK[@]}" bench --device gpu "${quick[@]}" --ops torch-module,train,backward --dtype float32 --shapes all \
  --backends cupy,numba-cuda,torch-cuda \
  --json "$OUT_DIR/bench-gpu-module.json" 2>&1 | tee "$OUT_DIR/bench-gpu-module.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== summary"
if [ -f "$OUT_DIR/bench-gpu.json" ]; then
  "$PY" -m bnkernels.bench.summary "$OUT_DIR/bench-gpu.json" | tee "$OUT_DIR/summary.txt"
fi
exit $status
