#!/usr/bin/env bash
# The one GPU check of this repository, in parts (GPU_CHECK_PARTS, default all of them):
#   tests      the `gpu`-marked tests;
#   loss_head  the loss-head benchmark (benchmarks/loss_head_gpu.py) at N=16384, V=151936, D=4096, bf16;
#   grpo_head  GRPO's loss head (benchmarks/grpo_head.py --device cuda) at the same shape, dapo beta 0.04 off-policy,
#              token and sequence level: ours on triton, TRL's head + TRL's loss, Liger's GRPO loss, the floor;
#   roste      the RoSTE training-step benchmark at Qwen2.5-0.5B's block shapes;
#   trainer_step  whole training steps (benchmarks/trainer_step.py) of FusedSFT (nll, dft), ASFT, OTR and PoFT
#              against stock SFTTrainer: Qwen2.5-0.5B's shapes with random weights, bf16, full fine-tuning,
#              batch 8 x 1024 tokens. Added in performance round 2; not yet measured on GPU.
#
#   bash benchmarks/gpu_check.sh                                  # results under $OUT (default: ./gpu_check_out)
#   GPU_CHECK_PARTS="tests grpo_head" bash benchmarks/gpu_check.sh  # a subset of: tests loss_head grpo_head roste
#                                                                    # trainer_step
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

PARTS=" ${GPU_CHECK_PARTS:-tests loss_head grpo_head roste trainer_step} "
tests_rc=0 bench_rc=0 grpo_rc=0 roste_rc=0 step_rc=0

if [[ "$PARTS" == *" tests "* ]]; then
    echo "== GPU tests"
    timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_backends.py tests/test_fake_quant_kernel.py tests/test_roste.py -rs \
        2>&1 | tee "$OUT/gpu_tests.log"
    tests_rc=${PIPESTATUS[0]}
fi

if [[ "$PARTS" == *" loss_head "* ]]; then
    echo "== loss-head benchmark"
    timeout 330 python3 benchmarks/loss_head_gpu.py ${BENCH_ARGS:-} --json "$OUT/loss_head_gpu.json" \
        --markdown "$OUT/loss_head_gpu.md" 2>&1 | tee "$OUT/benchmark.log"
    bench_rc=${PIPESTATUS[0]}
fi

if [[ "$PARTS" == *" grpo_head "* ]]; then
    echo "== GRPO head benchmark"
    # results are written after each level, so a run the timeout cuts short keeps the token level
    timeout 150 python3 benchmarks/grpo_head.py --device cuda -N 16384 -V 151936 -D 4096 --dtype bfloat16 \
        --backend triton --rounds 3 --json "$OUT/grpo_head_gpu.json" --markdown "$OUT/grpo_head_gpu.md" \
        2>&1 | tee "$OUT/grpo_head.log"
    grpo_rc=${PIPESTATUS[0]}
fi

if [[ "$PARTS" == *" roste "* ]]; then
    echo "== RoSTE step benchmark"
    timeout 240 python3 benchmarks/roste.py --device cuda --preset qwen2.5-0.5b --batch-size 8 --max-length 1024 \
        --rounds 2 --steps-per-round 6 --output "$OUT/roste_gpu.json" 2>&1 | tee "$OUT/roste.log"
    roste_rc=${PIPESTATUS[0]}
fi

if [[ "$PARTS" == *" trainer_step "* ]]; then
    echo "== whole training steps vs stock SFTTrainer"
    # each trainer in its own process; 16 tiny conversations per row make rows of about 1024 tokens
    timeout 240 python3 benchmarks/trainer_step.py --device cuda --preset qwen2.5-0.5b --full --batch_size 8 \
        --max_length 1024 --conversations_per_row 16 --steps 6 --warmup 2 --trainers stock sft dft asft otr poft \
        --json "$OUT/trainer_step_gpu.json" --markdown "$OUT/trainer_step_gpu.md" 2>&1 | tee "$OUT/trainer_step.log"
    step_rc=${PIPESTATUS[0]}
fi

echo "gpu tests rc=$tests_rc, loss-head benchmark rc=$bench_rc, grpo-head benchmark rc=$grpo_rc," \
    "roste benchmark rc=$roste_rc, trainer-step benchmark rc=$step_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$grpo_rc" = 0 ] && [ "$roste_rc" = 0 ] && [ "$step_rc" = 0 ]
