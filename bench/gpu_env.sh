# Sourced by the bench/gpu_*.sh scripts on the device machine: the carried wheels, the environment, $OUT,
# a seconds-left clock (left) against BUDGET, and the card's line in $OUT/gpu.txt.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; T0=$(date +%s); BUDGET=${BUDGET:-570}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/src:$PYTHONPATH || exit 1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -f SOURCE_COMMIT ] && export BENCH_SOURCE_COMMIT=$(cat SOURCE_COMMIT)  # bench/gpu_snapshot.sh: the header's commit
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
