"""Single-process training-step throughput: megolmo vs transformers' ``Olmo2ForCausalLM`` vs OLMo-core.

Every peer trains the same OLMo 2 architecture on the same batch with the same AdamW settings
(lr 1e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 except on the embeddings, foreach) and
gradient clipping at 1.0. A step is zero-grad + forward + backward + clip + optimizer step.
Starting weights are megolmo's, copied into the peers, so the first-step losses agree and show
that the three models compute the same function.

Each (precision, activation checkpointing) pair is one group (``--precisions fp32,bf16,fp8``,
``--activation-checkpointing off,on``); the peers of a group are built, timed and freed together.
Precision, as each code base is normally run in one process:

* megolmo: the trainer's own path, bf16 parameters + fp32 grad buffer + fp32 master weights
  (``FlatBuffers`` + ``DistributedAdamW``); fp32 is plain fp32; fp8 is bf16 parameters with the
  GEMMs in FP8 (``--fp8-recipe delayed|current``). Kernels are chosen as the trainer does
  (``choose_kernels("auto", ...)`` + ``apply_kernels``): Transformer Engine where installed on a
  GPU, so that is what gets measured. fp8 on a CPU is skipped with the trainer's one-line reason.
  Loss: cross-entropy + 1e-5 z-loss. Checkpointing: ``ModelConfig.activation_checkpointing``.
* transformers: ``model.to(bfloat16)`` and torch AdamW on the bf16 parameters; loss via
  ``labels=`` (transformers has no z-loss). Attention: SDPA. Checkpointing:
  ``gradient_checkpointing_enable`` (non-reentrant). No fp8 (skipped).
* OLMo-core: ``model.to(bfloat16)`` and torch AdamW on the bf16 parameters; loss from its LM
  head (sum reduction divided by the loss-token count, z-loss 1e-5), as its train module does.
  Checkpointing: ``apply_activation_checkpointing(full)``. No fp8 (skipped).

Peers are timed in alternation (one step each, rotating who goes first) so machine drift hits all
of them alike; a peer's time is its median step. On CUDA, steps and the matmul are timed by CUDA events
on the GPU's own clock (``timing.time_on_device``: a host clock would time the kernel launches); on a
CPU by ``time.perf_counter``. FLOP/s (model FLOPs, attention included) are divided by the rate of one
large ``torch.mm`` of the parameter dtype measured in this run (the "matmul rate"; bf16 for fp8 rows):
on CPUs that stands in for a hardware peak. On known GPUs MFU is also given against the dense BF16 peak
(989 TFLOP/s on an H100 SXM), fp8 rows included, as OLMo-core and Megatron report FP8 runs. On CUDA
each row has its memory: ``resident_bytes`` (model, gradients and optimizer state, after the first
step), ``peak_step_bytes`` (a step's transient on top) and their sum ``peak_bytes_alone`` (what the
peer needs on its own); megolmo rows at sequence 4096 are compared with OLMo-core's published
per-GPU tokens/s (``PUBLISHED_TOKENS_PER_S``).

The run for the issue's goals (55k tokens/s bf16, 65k fp8, 60% of the bf16 matmul rate), on one H100:

    python tools/bench_train.py --device cuda --model olmo2_1b --seq-len 4096 --batch 4 \\
        --precisions bf16,fp8 --activation-checkpointing off,on --peers megolmo --json bench_gpu.json

and again with ``--compile`` (every peer's blocks through ``torch.compile``, as OLMo-core's published
figures are taken). Peers of a group stay resident together on the one GPU, so the default peer set may
not fit at olmo2_1b: run the peers separately (``--peers transformers``, ``--peers olmo_core``).
``tools/gpu_validate.sh`` runs all of this on a lent GPU machine.

Modules, one job each: ``settings`` (what a run measures: BenchSettings, Variant, the model),
``peers`` (one builder per code base, each returning a Runner), ``timing`` (device timing, CUDA memory,
the matmul rate), ``benchmark`` (build, time and free each group), ``report`` (rows, goals, the table),
``cli`` (the command line of tools/bench_train.py).
"""
from megolmo.benchmarks.train_step.benchmark import run_benchmark
from megolmo.benchmarks.train_step.cli import main
from megolmo.benchmarks.train_step.peers import BUILDERS, NO_FP8, olmo_core_name, reference_model
from megolmo.benchmarks.train_step.report import PUBLISHED_TOKENS_PER_S, format_table, published_tokens_per_s
from megolmo.benchmarks.train_step.settings import BenchSettings
from megolmo.benchmarks.train_step.timing import time_on_device

__all__ = ["BUILDERS", "NO_FP8", "PUBLISHED_TOKENS_PER_S", "BenchSettings", "format_table", "main",
           "olmo_core_name", "published_tokens_per_s", "reference_model", "run_benchmark", "time_on_device"]
