#!/usr/bin/env bash
# Every CUDA check of the project in one run, each step with a hard time limit; all output goes to
# $OUT/gpu_check.log (the device tool brings $OUT back). Run it once per GPU session:
#
#   bash benchmarks/gpu_wheels.sh                      # here, once: wheels the GPU image lacks -> .whl/
#   device run, carry [".whl"]:  bash benchmarks/gpu_check.sh
#   DEVICE=cpu TINY=1 bash benchmarks/gpu_check.sh     # the same steps on CPU, small, to test this script
#
# Then write the figures into benchmarks/RESULTS.md with the card, the versions and the date.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
LOG=$OUT/gpu_check.log
DEVICE=${DEVICE:-cuda}
TINY=${TINY:-}
if [ -d .whl ] && [ "$DEVICE" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
: > "$LOG"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v "kernels-community\|warnings.warn" | tee -a "$LOG"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$LOG"
}

if [ -n "$TINY" ]; then  # sizes for a CPU trial of this script
  LORA=(--tiny --steps 1 --warmup 0)
  QUANT=(--hidden 64 --intermediate 128 --layers 2 --heads 2 --seq 32 --steps 1 --warmup 0 --repeats 1)
else  # the 1.1B Llama shape of DESIGN.md, bf16, 4 x 2048 tokens (QLoRA: 4 x 1024)
  LORA=(--steps 10 --warmup 2)
  QUANT=(--hidden 2048 --intermediate 5632 --layers 22 --heads 32 --rank 16 --batch 4 --seq 1024 --steps 5
         --warmup 2 --repeats 1)
fi

step environment 60 python3 -c "import torch, transformers, lightning, bitsandbytes, peft; \
print('torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', \
'| transformers', transformers.__version__, '| lightning', lightning.__version__, '| bitsandbytes', bitsandbytes.__version__, \
'| peft', peft.__version__)"
step qlora-tests 180 env FTLAB_TEST_DEVICE="$DEVICE" python3 -m pytest -q -x -p no:cacheprovider tests/peft/test_qlora.py
step lora-vs-peft 240 python3 benchmarks/bench_lora.py --device "$DEVICE" --gpu-table "${LORA[@]}"
step qlora-vs-peft 240 python3 benchmarks/bench_methods.py --device "$DEVICE" --only quant "${QUANT[@]}"
echo "=== done: $LOG" | tee -a "$LOG"
