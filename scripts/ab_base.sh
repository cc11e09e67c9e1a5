#!/bin/bash
# Writes the code of COMMIT (flexnsa/ and profiling/'s Python, not its results) to .ab/base, so a
# device call can time this tree against it on one machine (gpu_checks.sh part ab_8k; carry .ab).
#   bash scripts/ab_base.sh COMMIT
set -euo pipefail
cd "$(dirname "$0")/.."
commit=${1:?usage: bash scripts/ab_base.sh COMMIT}
rm -rf .ab/base && mkdir -p .ab/base
git archive "$commit" flexnsa $(git ls-tree --name-only "$commit" profiling/ | grep -v '^profiling/results$') | tar x -C .ab/base
git rev-parse "$commit" > .ab/base/.commit
echo "ab_base: $(cat .ab/base/.commit) in .ab/base ($(du -sh .ab/base | cut -f1))"
