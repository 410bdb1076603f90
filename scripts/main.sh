#!/usr/bin/env bash
# Set up (idempotent) and run the main job: `tokenmerge demo` on the packaged reference models (every method vs the
# unaccelerated images: comparison grid, speed ratio and fidelity table in results/demo, about two minutes on a CPU).
# The former main job, the SD 1.5 UNet CPU benchmark, is `python benchmarks/unet_cpu.py` (see docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/tokenmerge demo --out "${OUT:-results/demo}" --overwrite "$@"
