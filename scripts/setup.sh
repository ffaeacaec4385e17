#!/usr/bin/env bash
# Installs mixreorg (editable, from this checkout) with its test/data extras, never replacing the
# pinned CPU torch wheel (constraints.txt). Idempotent: when everything imports from this checkout
# already, it does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
here=$(pwd -P)
if ! $PY - "$here" <<'PYCHECK' >/dev/null 2>&1
import os, sys
import hypothesis, pytest, pytest_benchmark, ruff, safetensors, timm, transformers, triton  # noqa: F401
import mixreorg
assert os.path.realpath(mixreorg.__file__).startswith(sys.argv[1] + os.sep)
PYCHECK
then
    $PY -m pip install -q -c constraints.txt -e ".[test]"
fi
