"""Training-step throughput of megolmo vs transformers vs OLMo-core on one OLMo 2 config, fp32 and bf16.

`python tools/bench_train.py [--model bench|olmo2_1b|...] [--seq-len 512] [--batch 4] [--steps 6] [--warmup 2]
[--precisions fp32,bf16] [--peers megolmo,transformers,olmo_core] [--threads N] [--device cpu|cuda] [--json OUT]`
(the logic lives in megolmo/benchmarks/train_step.py).
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
