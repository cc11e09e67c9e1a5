#!/usr/bin/env bash
# The main job: the per-branch latency sweep (python -m profiling; arguments are passed on).
# On a GPU machine it uses that machine's python3 (its CUDA torch); elsewhere it sets up .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m profiling "$@"
fi
bash scripts/setup_env.sh >/dev/null
exec .venv/bin/python -m profiling "$@"
