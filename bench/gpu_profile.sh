#!/bin/bash
# Several benches with --profile in one GPU call (see bench/NOTES.md). Run on the device machine from the repo
# root (carry .whl). Each argument is one stage, "label:extra bench arguments", run in order while time is left:
#   PRESET=qwen2-1.5b TESTS="tests/gpu/test_x.py" bash bench/gpu_profile.sh \
#     "lora:--methods hf,turbotune,unsloth" "qlora:--qlora --methods hf,turbotune"
# TESTS (pytest paths) run first, then SCRIPTS (python files taking --json PATH). Logs, JSON and one archive
# of the profile reports land under $OUT.
BUDGET=${BUDGET:-570}; . "$(dirname "$0")/gpu_env.sh"
if [ -n "${TESTS-}" ]; then
  echo "== gpu tests: $TESTS"
  timeout ${TEST_LIMIT:-150} python3 -m pytest $TESTS -q --maxfail=3 -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed|Error" "$OUT/gpu_tests.txt" | tail -6
fi
for script in ${SCRIPTS-}; do  # standalone GPU scripts (e.g. bench/nf4_dequant.py), after the tests
  echo "== $script"; name=$(basename "$script" .py)
  timeout ${SCRIPT_LIMIT:-150} python3 "$script" --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1; tail -${SCRIPT_TAIL:-12} "$OUT/$name.txt"
done
for stage in "$@"; do
  label=${stage%%:*}; extra=${stage#*:}
  [ $(left) -lt 90 ] && { echo "== $label: skipped, $(left) s left"; continue; }
  echo "== bench ${PRESET:-qwen2-1.5b} $label ($(left) s left)"
  timeout $(( $(left) - 20 )) python3 -m turbotune bench --preset ${PRESET:-qwen2-1.5b} --cache-dir /tmp/bench-cache \
    --steps ${STEPS:-7} --warmup 2 --profile "$OUT/prof-$label" --json "$OUT/bench-$label.json" $extra \
    > "$OUT/bench-$label.txt" 2>&1
  grep -E "^\| |^- turbotune|Error|error" "$OUT/bench-$label.txt" | grep -v -- "---|" | tail -12
done
for f in "$OUT"/prof*/profile-*.txt; do [ -f "$f" ] && sed -n 2p "$f" | sed "s|^|$(basename $(dirname $f))/$(basename $f): |"; done
( cd "$OUT" && tar czf logs.tgz prof-* bench-*.txt gpu.txt 2>/dev/null && rm -rf prof-* bench-*.txt gpu.txt )  # 8 files at most come back
