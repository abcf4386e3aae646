#!/usr/bin/env bash
# lfu with accelerate: ACCELERATE_CONFIG=single_gpu|multi_gpu|fsdp2|deepspeed_zero2|deepspeed_zero3 (default multi_gpu).
# Extra arguments go to the method and override the YAML (e.g. --learning_rate 1e-5); CONFIG=path picks another YAML.
set -euo pipefail
cd "$(dirname "$0")/../.."
accelerate launch --config_file "examples/accelerate/${ACCELERATE_CONFIG:-multi_gpu}.yaml" \
    examples/train.py lfu --config "${CONFIG:-examples/configs/lfu.yaml}" "$@"
