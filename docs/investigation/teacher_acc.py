"""How right the caption-grounded teacher is: on training-stream batches (SynthShapes seed 1000, not
the training seed), each stage-1 patch's label over its image's own noun prompts (what
``grounded_seg_loss`` teaches the grouping), mapped to the prompt's head noun, against the class
that covers most of the patch. Reported on thing patches (the object's shape) and stuff patches,
and only over patches whose class the caption names (the teacher cannot name the others).

    python docs/investigation/teacher_acc.py RUN_FOLDER [batches] [--ema]

``--ema``: score the run's EMA teacher (``objective.grounded_teacher=ema``, the ``teacher.module``
weights of its last checkpoint) instead of the trained model.
"""
import sys
from collections import Counter

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
from mixreorg.data.synthshapes import SynthShapes, SynthShapesStream
from mixreorg.recipes.data import BatchBuilder
from mixreorg.recipes.loading import load_inference_model

ema = "--ema" in sys.argv
args = [a for a in sys.argv[1:] if a != "--ema"]
model, _, cfg = load_inference_model(args[0], with_config=True)
if ema:
    from pathlib import Path

    last = sorted((Path(args[0]) / "checkpoints").glob("ckpt-*.pt"))[-1]
    state = torch.load(last, map_location="cpu", weights_only=False)
    state = state.get("model", state)
    teacher = {k[len("teacher.module."):]: v for k, v in state.items() if k.startswith("teacher.module.")}
    if not teacher:
        raise SystemExit(f"{last} holds no EMA teacher (teacher.module.*)")
    model.load_state_dict(teacher)
model.eval()
n_batches = int(args[1]) if len(args) > 1 else 4
stream = iter(SynthShapesStream(64, seed=1000, image_size=cfg.data.image_size))
builder = BatchBuilder(cfg, context_length=cfg.model.text["context_length"])
names = list(SynthShapes.CLASS_NAMES)
hits, total = Counter(), Counter()
with torch.no_grad():
    for step in range(n_batches):
        raw = next(stream)
        batch = builder(raw, step=step)
        out = model.encode_image(batch["images"])
        patch = F.normalize(model.project_patches(out["stage1_tokens"]).float(), dim=-1)  # [B, L, D]
        b, k, t = batch["prompts"].shape
        prompts = model.encode_text(batch["prompts"].reshape(b * k, t)).float().reshape(b, k, -1)
        logits = torch.einsum("bld,bkd->blk", patch, F.normalize(prompts, dim=-1))
        logits = logits.masked_fill(~batch["prompt_mask"][:, None, :], -1e4)
        choice = logits.argmax(-1)  # [B, L]
        h = int(round(patch.shape[1] ** 0.5))
        mask = torch.as_tensor(raw["mask"]).long()  # [B, S, S]
        onehot = F.one_hot(mask, 10).permute(0, 3, 1, 2).float()
        major = F.adaptive_avg_pool2d(onehot, h).flatten(2).argmax(1)  # [B, L] majority class per patch
        heads = batch["keys"]["prompt_head"]
        for i in range(b):
            said = {names.index(hd) for hd in heads[i] if hd in names}
            for l in range(h * h):
                c = int(major[i, l])
                if c not in said:
                    continue
                head = heads[i][int(choice[i, l])]
                kind = "thing" if c >= 4 else "stuff"
                total[kind] += 1
                total[names[c]] += 1
                if head == names[c]:
                    hits[kind] += 1
                    hits[names[c]] += 1
print(" ".join(f"{key} {hits[key] / max(total[key], 1):.2f} (n={total[key]})" for key in
               ["thing", "stuff"] + names))
