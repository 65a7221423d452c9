"""Training-step throughput of megolmo vs transformers vs OLMo-core on one OLMo 2 config: tokens/s,
TFLOP/s, the fraction of a measured large torch.mm, MFU against the GPU's dense BF16 peak and peak
memory (CUDA), for each precision (fp32, bf16, fp8) and activation checkpointing off/on.

`python tools/bench_train.py [--model bench|olmo2_1b|...] [--seq-len 512] [--batch 4] [--steps 6] [--warmup 2]
[--precisions fp32,bf16,fp8] [--activation-checkpointing off,on] [--fp8-recipe delayed|current]
[--peers megolmo,transformers,olmo_core] [--threads N] [--device cpu|cuda] [--mm-size N] [--json OUT]`

fp8 runs megolmo only (the peers have no FP8 path and are listed as skipped), and needs a GPU with
FP8 tensor cores. The issue's goals on one H100 (run peers separately: a group's peers stay resident
together on the GPU):

    python tools/bench_train.py --device cuda --model olmo2_1b --seq-len 4096 --batch 4 \\
        --precisions bf16,fp8 --activation-checkpointing off,on --peers megolmo --json bench_gpu.json

The logic lives in the package megolmo/benchmarks/train_step/ (its cli module is this command line).
"""

import os
import sys

try:
    import megolmo  # noqa: F401
except ImportError:  # run from a checkout without installing: the repo root is this file's parent's parent
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megolmo.benchmarks.train_step import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
