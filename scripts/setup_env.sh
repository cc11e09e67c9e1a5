#!/usr/bin/env bash
# Creates .venv from scratch for a CPU machine: pinned torch 2.13.0 CPU build, triton for the
# Triton interpreter, then flexnsa in editable mode with its dev and profile extras.
# torch is installed first and pinned, so no later step can pull a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" "triton==3.7.1"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,profile]"
.venv/bin/python -c "import torch, triton; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('env ready: torch', torch.__version__, 'triton', triton.__version__)"
