#!/bin/bash
# On the CPU machine, from the repo root: the committed tree (HEAD) exported to .gpu_snap/ (git-ignored) with its
# commit in .gpu_snap/SOURCE_COMMIT, for a device run that carries [".whl", ".gpu_snap"]; the bench header then
# names that commit (bench/gpu_env.sh exports it as BENCH_SOURCE_COMMIT). Uncommitted changes are not in it.
set -euo pipefail
grep -qx "/.gpu_snap/" .git/info/exclude 2>/dev/null || echo "/.gpu_snap/" >> .git/info/exclude
rm -rf .gpu_snap && mkdir .gpu_snap
git archive HEAD | tar -x -C .gpu_snap
git rev-parse --short HEAD > .gpu_snap/SOURCE_COMMIT
echo ".gpu_snap: $(cat .gpu_snap/SOURCE_COMMIT)$(git status --porcelain --untracked-files=no | grep -q . && echo ' (uncommitted changes left out)')"
