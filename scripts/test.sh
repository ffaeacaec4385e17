#!/usr/bin/env bash
# README command 2: set up, lint, and run the whole test suite (Triton kernels run under
# TRITON_INTERPRET=1 on CPU; tests/conftest.py sets it before any kernel is defined).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_browser.sh
PY=${PYTHON:-python3}
$PY -m ruff check mixreorg tests benchmarks
$PY -m pytest -q "$@"
