#!/usr/bin/env bash
# README command 1: set up, then run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
$PY -m mixreorg.recipes.mix_demo --out outputs/mix_demo.png "$@"
