#!/usr/bin/env bash
# Set up (idempotent) and run the main job: the CPU benchmark of ToMA vs tomesd on the real-size SD 1.5 UNet.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/python benchmarks/unet_cpu.py --rounds "${ROUNDS:-3}" --out "${OUT:-results/unet_cpu.json}" "$@"
