#!/usr/bin/env bash
# The project's test command: sets everything up from scratch, then runs pytest (extra
# arguments go to pytest). GPU tests are marked `gpu` and skip themselves without CUDA.
# The tests are spread over up to 4 pytest-xdist workers, one per core: the Triton interpreter
# keeps one core busy per process (a 2-core CI machine: 532 s instead of 970 s, session 18).
# FLEXNSA_TEST_WORKERS=0 runs them in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
cores=$(nproc 2>/dev/null || echo 1)
workers=${FLEXNSA_TEST_WORKERS:-$(( cores >= 4 ? 4 : (cores >= 2 ? cores : 0) ))}
exec .venv/bin/python -m pytest -n "$workers" "$@"
