#!/bin/bash
# Issue 16 on the device, one call: TESTS (pytest paths) first, then `turbotune bench --trainer sft` once per
# argument ("label:bench arguments") while time is left; logs and JSON under $OUT. From the repo root (carry .whl):
#   TESTS=tests/gpu/test_trainer_step_gpu.py bash bench/gpu_sft_bench.sh "lora:--preset qwen2-1.5b --methods hf,turbotune"
# Leading VAR=value words of a stage's arguments are set in the bench's environment ("ab:TURBOTUNE_X=1 --qlora");
# SRC=DIR runs that stage on another source tree (an A/B against an older commit exported to a carried folder),
# TRAINER=loop runs turbotune's own-loop bench instead of TRL's SFTTrainer. ONE_PRESET=1 keeps only the stage's
# preset in the model cache (8-9B presets are 16-19 GB each on a 64 GB disk). HOST_SPLIT: see the end.
BUDGET=${BUDGET:-575}; . "$(dirname "$0")/gpu_env.sh"
if [ -n "${TESTS-}" ]; then
  timeout ${TEST_LIMIT:-150} python3 -m pytest $TESTS -q -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1
  grep -E "^(FAILED|ERROR)|^E  |passed|failed" "$OUT/gpu_tests.txt" | tail -8
fi
for stage in "$@"; do
  label=${stage%%:*}; extra=${stage#*:}
  [ $(left) -lt 60 ] && { echo "== $label: skipped, $(left) s left"; continue; }
  echo "== $label ($(left) s left)"
  envs=(); args=($extra)
  trainer=sft
  while [[ ${#args[@]} -gt 0 && ${args[0]} == [A-Z]*=* ]]; do
    case ${args[0]} in
      SRC=*) envs+=("PYTHONPATH=/tmp/site:$PWD/${args[0]#SRC=}") ;;
      TRAINER=*) trainer=${args[0]#TRAINER=} ;;
      *) envs+=("${args[0]}") ;;
    esac
    args=("${args[@]:1}")
  done
  if [ -n "${ONE_PRESET-}" ]; then
    preset=$(echo " $extra " | sed -n 's/.* --preset \([^ ]*\) .*/\1/p')
    for d in /tmp/bench-cache/*; do [[ -e $d && $(basename "$d") != "$preset"-seed* ]] && rm -rf "$d"; done
  fi
  timeout $(( $(left) - 15 )) env "${envs[@]}" python3 -m turbotune bench --trainer $trainer --cache-dir /tmp/bench-cache \
    --json "$OUT/sft-$label.json" "${args[@]}" > "$OUT/sft-$label.txt" 2>&1
  grep -E "^\| |^- (turbotune|unsloth|hf|liger)|Error|error:" "$OUT/sft-$label.txt" | grep -v -- "---|" | cut -c1-300 | tail -14
done
# HOST_SPLIT="preset:args" (e.g. "qwen2-1.5b:--qlora --steps 30 --warmup 10"): bench/sft_host_split.py on the model
# a stage cached, with perf_counter timers, then under cProfile (host_split*.txt)
model=$([ -n "${HOST_SPLIT-}" ] && ls -d /tmp/bench-cache/"${HOST_SPLIT%%:*}"-seed* 2>/dev/null | head -1)
[ -n "${HOST_SPLIT-}" ] && [ -z "$model" ] && echo "== host split: no cached ${HOST_SPLIT%%:*}"
if [ -n "$model" ]; then
  for mode in timers cprofile; do
    [ $(left) -lt 60 ] && { echo "== host split ($mode): skipped, $(left) s left"; continue; }
    flags=$([ $mode = cprofile ] && echo "--cprofile --top 40")
    echo "== host split, $mode ($(left) s left)"
    timeout $(( $(left) - 10 )) python3 bench/sft_host_split.py --model "$model" ${HOST_SPLIT#*:} $flags \
      > "$OUT/host_split_$mode.txt" 2>&1
    grep -A16 "ms per step" "$OUT/host_split_$mode.txt" | grep -v "^{" | cut -c1-160 | head -18
  done
fi
( cd "$OUT" && tar czf logs.tgz sft-*.txt 2>/dev/null && rm -f sft-*.txt )
