#!/usr/bin/env bash
# The GPU check (issue #25) in one call, from a bare machine without internet (docs/benchmarks.md, "The GPU check"):
# installs the wheels brought along in $WHEELS (default .whl/: diffusers, which that machine lacks) into a folder of
# their own, puts it and src/ on PYTHONPATH, then runs benchmarks/gpu_check.py with the arguments given.
#
#   bash benchmarks/gpu_check.sh --out "$OUT"                                            # one GPU, every part
#   PYTHON=.venv/bin/python WHEELS=none bash benchmarks/gpu_check.sh --tiny --device cpu --out /tmp/gpu   # CPU smoke
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/tokenmerge-site}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PYTHON" -c "import diffusers, torch, tokenmerge; print('diffusers', diffusers.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
exec "$PYTHON" benchmarks/gpu_check.py "$@"
