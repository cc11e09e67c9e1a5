#!/bin/bash
# Runs gpu_checks.sh parts on a lent GPU machine whose stack lacks fla (PITFALLS.md): installs the
# wheels carried in .whl/ (pip download --no-deps fla-core==0.6.0 -d .whl) to /tmp/site, stamps the
# commit from .commit (git rev-parse HEAD > .commit before the call), and writes each part's files
# under $OUT/<part>/, packed as $OUT/<part>.tgz when the part ends (the tool brings back 8 files), so a
# call cut at its time limit still brings back the parts that finished and the cut part's first files.
#   bash scripts/device_parts.sh PART [PART ...]      (TIMEOUT_S=... for gpu_checks' test timeout)
set -u
out=${OUT:?set OUT: the folder whose files come back}
if compgen -G ".whl/*.whl" > /dev/null; then
  pip install -q --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1 || echo "device_parts: wheel install failed"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export FLEXNSA_COMMIT=${FLEXNSA_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for part in "$@"; do
  echo "== $part $(date +%T)"
  bash scripts/gpu_checks.sh "$out/$part" "$part"
  # the device tool brings back at most 8 files: a finished part travels as one archive
  tar czf "$out/$part.tgz" -C "$out" "$part" && rm -rf "${out:?}/$part"
done
