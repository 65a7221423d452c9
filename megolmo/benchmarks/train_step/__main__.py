"""``python -m megolmo.benchmarks.train_step``: the same command line as tools/bench_train.py."""
import sys

from megolmo.benchmarks.train_step.cli import main

sys.exit(main())
