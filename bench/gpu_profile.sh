#!/bin/bash
# Measure and profile in one GPU call (see bench/NOTES.md): LoRA and QLoRA benches with --profile, then the gpu
# tests in whatever time is left. Run on the device machine from the repo root (carry .whl):
#   PRESET=qwen2-1.5b LORA_METHODS=... QLORA_METHODS=... bash bench/gpu_profile.sh
# Each stage's log, JSON and profile reports land under $OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; T0=$(date +%s); BUDGET=${BUDGET:-570}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/src:$PYTHONPATH || exit 1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
PRESET=${PRESET:-qwen2-1.5b}
if [ -n "${LORA_METHODS-hf,turbotune,turbotune-auto,unsloth,liger}" ]; then
  echo "== bench $PRESET LoRA"
  timeout $(( $(left) - 60 )) python3 -m turbotune bench --preset $PRESET --cache-dir /tmp/bench-cache \
    --methods ${LORA_METHODS-hf,turbotune,turbotune-auto,unsloth,liger} --steps ${STEPS:-7} --warmup 2 \
    --profile "$OUT/prof" --json "$OUT/bench-lora.json" > "$OUT/bench-lora.txt" 2>&1; tail -${TAILN:-9} "$OUT/bench-lora.txt"
fi
if [ -n "${QLORA_METHODS-}" ]; then
  echo "== bench $PRESET QLoRA"
  timeout $(( $(left) - 30 )) python3 -m turbotune bench --preset $PRESET --cache-dir /tmp/bench-cache --qlora \
    --methods $QLORA_METHODS --steps ${STEPS:-7} --warmup 2 \
    --profile "$OUT/prof-qlora" --json "$OUT/bench-qlora.json" > "$OUT/bench-qlora.txt" 2>&1; tail -${TAILN:-9} "$OUT/bench-qlora.txt"
fi
for f in "$OUT"/prof*/profile-*.txt; do [ -f "$f" ] && sed -n 2p "$f" | sed "s|^|$f: |"; done
( cd "$OUT" && tar czf profiles.tgz prof* 2>/dev/null && rm -rf prof prof-qlora )  # 8 files at most come back
if [ -n "${TESTS-}" ] && [ $(left) -gt 40 ]; then
  echo "== gpu tests ($(left) s left)"
  timeout $(( $(left) - 10 )) python3 -m pytest $TESTS -q -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1; tail -4 "$OUT/gpu_tests.txt"
fi
