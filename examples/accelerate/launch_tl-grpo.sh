#!/usr/bin/env bash
# tl-grpo with accelerate: ACCELERATE_CONFIG=single_gpu|multi_gpu|fsdp2|deepspeed_zero2|deepspeed_zero3 (default multi_gpu).
# Extra arguments go to the method and override the YAML (e.g. --beta 0.0); CONFIG=path picks another YAML.
set -euo pipefail
cd "$(dirname "$0")/../.."
accelerate launch --config_file "examples/accelerate/${ACCELERATE_CONFIG:-multi_gpu}.yaml" \
    examples/train.py tl-grpo --config "${CONFIG:-examples/configs/tl-grpo.yaml}" "$@"
