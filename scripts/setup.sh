#!/usr/bin/env bash
# Create .venv and install tokenmerge with its test extras. Torch is pinned to the 2.13.0 CPU wheel through
# constraints.txt (the package itself accepts torch>=2.4); ca-tome is a test oracle installed without its pins.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt torch
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "ca-tome==0.1.3"
