#!/usr/bin/env bash
# README command 1: set up, then the main job: pretrain a tiny MixReorg on the embedded SynthShapes
# benchmark (preset tiny_grounded_mixreorg: the hybrid backbone, 720 steps or 480 s of training,
# about 7 minutes in all on 2 CPU cores with native bf16), evaluate it zero-shot, print the mIoU,
# and write the overlay picture and the loss plot to outputs/tiny_mixreorg/. Extra arguments go to
# the recipe (e.g. --model groupvit). The patch-mixing demo: python -m mixreorg.recipes.mix_demo
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
$PY -m mixreorg.recipes.pretrain --preset tiny_grounded_mixreorg --out outputs/tiny_mixreorg "$@"
