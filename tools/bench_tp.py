"""Tensor-parallel step time and communication vs the analytic Megatron scheme, TP = 1, 2, 4.

`python tools/bench_tp.py [--tp 1,2,4] [--sp off,on] [--seq-len 256] [--micro-batch 4] [--global-batch N]
[--steps 5] [--warmup 1] [--threads 1] [--precision fp32|bf16] [--hidden 256] [--ffn 768] [--layers 4]
[--heads 8] [--kv-heads 4] [--vocab 10000] [--json OUT]`

Launches one process per TP rank itself (torch.multiprocessing, gloo on CPU), runs the real Trainer's
training step, counts every collective of one step and prints a table with measured/analytic ratios
(the logic lives in megolmo/benchmarks/tensor_parallel.py). Exits 1 if the collectives differ from the analytic scheme.
"""

import os
import sys

try:
    import megolmo  # noqa: F401
except ImportError:  # run from a checkout without installing: the repo root is this file's parent's parent
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megolmo.benchmarks.tensor_parallel import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
