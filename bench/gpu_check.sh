#!/bin/bash
# The GPU checks in one command, each under a time limit (seconds; 0 skips a part), logs in $OUT:
# the GPU tests, then the decode and train-step benches against transformers. Run from the repo root:
#   bash bench/gpu_check.sh                      # T_TESTS=270 T_DECODE=130 T_TRAIN=150
#   T_TRAIN=0 DECODE_ARGS="--models deepseek-v3-tiny" bash bench/gpu_check.sh
export HF_HUB_OFFLINE=1 PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/r1kit-gpu-check}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.log"
part() {  # name, limit, command...
  local name=$1 limit=$2; shift 2
  [ "$limit" = 0 ] && return
  local s=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "$name: $(( $(date +%s) - s )) s"
}
part tests "${T_TESTS:-270}" python3 -m pytest tests/test_cuda.py -p no:warnings -p no:cacheprovider -rfE --durations=20
part decode "${T_DECODE:-130}" python3 bench/decode.py --device cuda --dtype bfloat16 ${DECODE_ARGS:-}
part train_step "${T_TRAIN:-150}" python3 bench/train_step.py --device cuda --dtype bfloat16 --batch 32 --seq 512
