#!/usr/bin/env bash
# Issue 7's GPU checks, for a lent GPU machine whose python3 already holds CUDA PyTorch and transformers
# but nothing else of ours (and no network): run `make gpu-wheels` here first and carry `.whl`.
#
#   bash tools/gpu_validate.sh STAGE [OUTDIR]     (OUTDIR defaults to $OUT, else gpu_out)
#
# Stages, each well inside one 10-minute device call:
#   tests   environment report + the GPU tests (tests/test_kernels.py, tests/test_float8.py)
#   bench   olmo2_1b, seq 4096: megolmo bf16 and fp8, activation checkpointing off and on, eager
#   compile the same with every block through torch.compile, checkpointing off
#   peers   transformers at bf16 on the same shape, eager and compiled, for the ratio in the same run
set -uo pipefail
stage="${1:?usage: gpu_validate.sh tests|bench|compile|peers [OUTDIR]}"
case "$stage" in tests|bench|compile|peers) ;; *)
  echo "gpu_validate.sh: unknown stage '$stage' (tests, bench, compile, peers)" >&2; exit 2 ;; esac
out="${2:-${OUT:-gpu_out}}"
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
bench=(python3 tools/bench_train.py --device cuda --model olmo2_1b --seq-len 4096 --batch 4 --steps 6 --warmup 2)
case "$stage" in
  tests)
    {
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
      python3 -c "from megolmo.kernels import available as a; import torch
print('transformer_engine:', a.transformer_engine_unavailable() or 'available')
print('nvidia_apex:', a.nvidia_apex_unavailable() or 'available')
print('torchao_float8:', a.torchao_float8_unavailable() or 'available')
print('fp8 tensor cores:', a.fp8_tensor_cores_unavailable(torch.device('cuda')) or 'available')"
    } 2>&1 | tee "$out/env.txt"
    python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py tests/test_float8.py \
      tests/test_trainer.py tests/test_checkpoint_faults.py -k "gpu or float8 or compiled" 2>&1 | tee "$out/gpu_tests.log" ;;
  bench)
    "${bench[@]}" --precisions bf16,fp8 --fp8-recipe current --activation-checkpointing off,on --peers megolmo \
      --json "$out/bench_eager.json" 2>&1 | tee "$out/bench_eager.txt" ;;
  compile)
    "${bench[@]}" --compile --precisions bf16,fp8 --fp8-recipe current --activation-checkpointing off \
      --peers megolmo --json "$out/bench_compiled.json" 2>&1 | tee "$out/bench_compiled.txt" ;;
  peers)
    "${bench[@]}" --precisions bf16 --peers transformers 2>&1 | tee "$out/peers_eager.txt"
    "${bench[@]}" --compile --precisions bf16 --peers transformers 2>&1 | tee "$out/peers_compiled.txt" ;;
esac
