#!/usr/bin/env bash
# Installs mixreorg (editable, from this checkout) with its test/data extras, never replacing the
# pinned CPU torch wheel (constraints.txt). Idempotent: when everything imports from this checkout
# already, it does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
here=$(pwd -P)
if ! $PY - "$here" <<'PYCHECK' >/dev/null 2>&1
import importlib.util, os, sys
need = ["hypothesis", "pytest", "pytest_benchmark", "ruff", "safetensors", "timm", "transformers", "triton",
        "einops", "instant_clip_tokenizer", "matplotlib", "tqdm", "braceexpand", "huggingface_hub", "tensorboard",
        "fsspec", "aiohttp", "playwright", "mixreorg"]
assert all(importlib.util.find_spec(n) is not None for n in need)
spec = importlib.util.find_spec("mixreorg")
assert os.path.realpath(spec.origin).startswith(sys.argv[1] + os.sep)
PYCHECK
then
    $PY -m pip install -q -c constraints.txt -e ".[test]"
fi
