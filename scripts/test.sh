#!/usr/bin/env bash
# The project's test command: sets everything up from scratch, then runs pytest (extra
# arguments go to pytest). GPU tests are marked `gpu` and skip themselves without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
