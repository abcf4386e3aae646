#!/usr/bin/env python
"""Train with any hf-plugins method; the script `accelerate launch` (or torchrun) starts on every process.

    accelerate launch --config_file examples/accelerate/multi_gpu.yaml examples/train.py asft --config run.yaml
    torchrun --nproc_per_node 2 examples/train.py sft --config examples/configs/sft.yaml

It is `hf-plugins <method> ...` as a file: the same arguments, the same YAML files (`trl sft`'s included).
"""

import sys

from hf_plugins.cli import main


if __name__ == "__main__":
    sys.exit(main())
