#!/usr/bin/env bash
# Issue 7's GPU checks in one go, for a lent GPU machine whose python3 already holds CUDA PyTorch and
# transformers but nothing else of ours (no network there): `make gpu-wheels` here first, carry `.whl`.
#
#   bash tools/gpu_validate.sh [OUTDIR]      (OUTDIR defaults to $OUT, else gpu_out)
#
# Writes OUTDIR/{env.txt, gpu_tests.log, bench_megolmo.json, bench_megolmo.txt, bench_transformers.txt}.
set -uo pipefail
out="${1:-${OUT:-gpu_out}}"
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  python3 -c "from megolmo.kernels import available as a; import torch; d=torch.device('cuda')
print('transformer_engine:', a.transformer_engine_unavailable() or 'available')
print('nvidia_apex:', a.nvidia_apex_unavailable() or 'available')
print('torchao_float8:', a.torchao_float8_unavailable() or 'available')
print('fp8 tensor cores:', a.fp8_tensor_cores_unavailable(d) or 'available')"
} 2>&1 | tee "$out/env.txt"
python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py tests/test_float8.py 2>&1 | tee "$out/gpu_tests.log"
python3 tools/bench_train.py --device cuda --model olmo2_1b --seq-len 4096 --batch 4 --steps 6 --warmup 2 \
  --precisions bf16,fp8 --fp8-recipe current --activation-checkpointing off,on --peers megolmo \
  --json "$out/bench_megolmo.json" 2>&1 | tee "$out/bench_megolmo.txt"
python3 tools/bench_train.py --device cuda --model olmo2_1b --seq-len 4096 --batch 4 --steps 6 --warmup 2 \
  --precisions bf16 --activation-checkpointing off,on --peers transformers 2>&1 | tee "$out/bench_transformers.txt"
