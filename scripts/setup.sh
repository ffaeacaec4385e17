#!/usr/bin/env bash
# Installs mixreorg and its test/data extras without ever replacing the pinned CPU torch wheel.
# Idempotent: a second run is a no-op check.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import mixreorg, pytest, hypothesis, timm, transformers, triton, webdataset" >/dev/null 2>&1; then
    $PY -m pip install -q -c constraints.txt -e ".[test]"
fi
