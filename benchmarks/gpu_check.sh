#!/usr/bin/env bash
# The one GPU check of this repository: the GPU tests, then the loss-head benchmark at N=16384, V=151936, D=4096, bf16.
#
#   bash benchmarks/gpu_check.sh            # results under $OUT (default: ./gpu_check_out)
#
# Packages the GPU image may lack (trl, liger-kernel, datasets and what they import) can be brought as wheels in
# ./.whl: they are installed into /tmp/site and put on PYTHONPATH; with no ./.whl the installed packages are used.
# Designed to finish within 8 minutes on one H100/H200; each step has its own time limit so one hang costs no more.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH#$PWD}"
fi

{ nvidia-smi; python3 -c "
import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
for name in ('transformers', 'trl', 'liger_kernel'):
    try: print(name, __import__(name).__version__)
    except Exception as e: print(name, 'unavailable:', e)
"; } 2>&1 | tee "$OUT/machine.txt"

echo "== GPU tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_backends.py -x -rs 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== loss-head benchmark"
timeout 330 python3 benchmarks/loss_head_gpu.py ${BENCH_ARGS:-} --json "$OUT/loss_head_gpu.json" --markdown "$OUT/loss_head_gpu.md" \
    2>&1 | tee "$OUT/benchmark.log"
bench_rc=${PIPESTATUS[0]}

echo "gpu tests rc=$tests_rc, benchmark rc=$bench_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
