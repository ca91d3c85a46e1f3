#!/usr/bin/env bash
# Install the test dependencies into ./.venv and run the whole test suite.
# This is the test command of README.md; .ci/run calls it. Extra arguments go
# to pytest. CPU only: tests marked `gpu` are deselected unless BNKERNELS_GPU=1.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# torch is the comparison point for the torch-marked tests; 2.13.0 CPU is
# what CI pins. cupy-cuda13x imports without a GPU, so the "cupy installed,
# no driver" path of backend selection is tested for real.
TEST_EXTRAS=${BNKERNELS_TEST_EXTRAS:-"torch==2.13.0 cupy-cuda13x"}

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
exec .venv/bin/python -m pytest -m "$MARKS" "$@"
