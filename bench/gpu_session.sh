#!/bin/bash
# One GPU call that checks, then measures (see bench/NOTES.md). Run on the device machine from the repo root:
#   bash bench/gpu_session.sh [bench presets...]      (carry .whl and .gpu/tok)
# Writes logs and JSON under $OUT; prints a short summary last.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/src:$PYTHONPATH || exit 1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch,transformers,peft,triton,bitsandbytes as b;print('torch',torch.__version__,'cuda',torch.version.cuda,'transformers',transformers.__version__,'peft',peft.__version__,'triton',triton.__version__,'bnb',b.__version__)" | tee -a "$OUT/gpu.txt"
echo "== example: Qwen2-1.5B architecture (random init), QLoRA, 50 steps"
MODEL=$(python3 bench/prepare_example_model.py qwen2-1.5b /tmp/bench-cache .gpu/tok 2>>"$OUT/example.txt" | tail -1)
timeout 300 python3 examples/finetune_qwen2.py --model "$MODEL" --max-steps 50 > "$OUT/example.txt" 2>&1; tail -16 "$OUT/example.txt"
for preset in ${@:-qwen2-1.5b}; do
  echo "== bench $preset"
  timeout 400 python3 -m turbotune bench --preset $preset --cache-dir /tmp/bench-cache --methods ${METHODS:-hf,turbotune,turbotune-auto,turbotune-min-memory,unsloth,liger} \
    --steps 7 --warmup 2 --json "$OUT/bench-$preset.json" > "$OUT/bench-$preset.txt" 2>&1; tail -14 "$OUT/bench-$preset.txt"
done
echo "== health check"; timeout 120 python3 -m turbotune check > "$OUT/check.txt" 2>&1; tail -12 "$OUT/check.txt"
echo "== gpu tests"; timeout 240 python3 -m pytest tests/gpu -q -x -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1; tail -3 "$OUT/gpu_tests.txt"
