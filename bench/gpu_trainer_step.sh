#!/bin/bash
# Issue 16 on the device, one call: the trainer-step GPU tests, then bench/sft_trainer_probe.py once per argument
# ("method:extra probe arguments"), each in its own process, while time is left. Run from the repo root (carry .whl):
#   bash bench/gpu_trainer_step.sh "stock:" "turbotune:--lengths mixed"
BUDGET=${BUDGET:-570}; . "$(dirname "$0")/gpu_env.sh"
if [ -n "${TESTS-tests/gpu/test_trainer_step_gpu.py}" ]; then
  timeout ${TEST_LIMIT:-240} python3 -m pytest ${TESTS-tests/gpu/test_trainer_step_gpu.py} -q -p no:cacheprovider \
    > "$OUT/gpu_tests.txt" 2>&1; grep -E "^(FAILED|ERROR)|^E  |passed|failed" "$OUT/gpu_tests.txt" | tail -12
fi
i=0
for run in "$@"; do
  i=$((i + 1)); m=${run%%:*}; extra=${run#*:}
  [ $(left) -lt 60 ] && { echo "skipped ($(left) s left): $run"; continue; }
  timeout $(( $(left) - 10 )) python3 -P bench/sft_trainer_probe.py --method $m $extra --json "$OUT/probe.jsonl" \
    > "$OUT/probe-$i.log" 2>&1 || tail -5 "$OUT/probe-$i.log"
  tail -1 "$OUT/probe-$i.log" | cut -c1-400
done
( cd "$OUT" && tar czf logs.tgz probe-*.log 2>/dev/null && rm -f probe-*.log )
