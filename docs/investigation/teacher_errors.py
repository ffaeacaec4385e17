"""Where the caption teacher's background errors come from (session 17): on training-stream batches
(SynthShapes seed 1000), the stage-1 patches whose class (the majority of the patch) is a background.

    python docs/investigation/teacher_errors.py RUN_FOLDER|CHECKPOINT [batches]

Printed:
* the background patches split by whether their image's prompts name the background, and whether the
  teacher (``teacher_labels``, soft) calls them an object; of those called an object though the
  background is named, how many by a bare noun ("circle") and how many by a coloured phrase
  ("red circle");
* object recall / precision and stuff recall / precision of four labelling rules over the image's
  prompts: the softmax of the similarities (the teacher's rule), and the argmax of the similarities
  re-centred per prompt by their mean over the image's patches, over the batch's patches, or
  z-scored over the batch's patches (a per-prompt offset would be removed by these).
"""
import argparse
from collections import Counter

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
from mixreorg.data.synthshapes import SynthShapes, SynthShapesStream
from mixreorg.losses.grounded import teacher_labels
from mixreorg.recipes.data import BatchBuilder
from mixreorg.recipes.loading import load_inference_model

parser = argparse.ArgumentParser()
parser.add_argument("run")
parser.add_argument("batches", nargs="?", type=int, default=2)
args = parser.parse_args()
model, _, cfg = load_inference_model(args.run, with_config=True)
model.eval()
stream = iter(SynthShapesStream(64, seed=1000, image_size=cfg.data.image_size))
builder = BatchBuilder(cfg, context_length=cfg.model.text["context_length"])
names = list(SynthShapes.CLASS_NAMES)  # 4 stuff classes, then 6 things
rules = ("softmax", "centred over the image", "centred over the batch", "z-scored over the batch")
split, called_by, scores = Counter(), Counter(), {r: Counter() for r in rules}
with torch.no_grad():
    for step in range(args.batches):
        raw = next(stream)
        batch = builder(raw, step=step)
        patch = model.project_patches(model.encode_image(batch["images"])["stage1_tokens"]).float()  # [B, L, D]
        b, k, t = batch["prompts"].shape
        prompts = F.normalize(model.encode_text(batch["prompts"].reshape(b * k, t)).float().reshape(b, k, -1), dim=-1)
        mask = batch["prompt_mask"][:, None, :]  # [B, 1, K]
        sim = torch.einsum("bld,bkd->blk", patch, prompts)  # [B, L, K] each patch against its image's prompts
        every = torch.einsum("bld,ckd->ckbl", patch, prompts).flatten(2)  # [B, K, B*L] each prompt, every patch
        choice = {
            "softmax": teacher_labels(patch, prompts, batch["prompt_mask"], 1 / 0.07).argmax(-1),
            "centred over the image": sim - sim.mean(1, keepdim=True),
            "centred over the batch": sim - every.mean(-1)[:, None, :],
            "z-scored over the batch": (sim - every.mean(-1)[:, None, :]) / every.std(-1)[:, None, :],
        }
        for r in rules[1:]:
            choice[r] = choice[r].masked_fill(~mask, -1e9).argmax(-1)  # [B, L]
        h = int(round(patch.shape[1] ** 0.5))
        onehot = F.one_hot(torch.as_tensor(raw["mask"]).long(), 10).permute(0, 3, 1, 2).float()
        major = F.adaptive_avg_pool2d(onehot, h).flatten(2).argmax(1)  # [B, L] majority class per patch
        heads, keys = batch["keys"]["prompt_head"], batch["keys"]["prompt"]
        for i in range(b):
            said = {hd for hd, ok in zip(heads[i], batch["prompt_mask"][i].tolist()) if ok}
            background_named = any(hd in names[:4] for hd in said)
            for pos in range(h * h):
                c = int(major[i, pos])
                for r in rules:
                    j = int(choice[r][i, pos])
                    head, kind = heads[i][j], "thing" if c >= 4 else "stuff"
                    if head in names:
                        as_kind = "thing" if names.index(head) >= 4 else "stuff"
                        scores[r]["labelled " + as_kind] += 1
                        scores[r]["right " + as_kind] += int(head == names[c])
                    if names[c] in said:
                        scores[r]["named " + kind] += 1
                        scores[r]["hit " + kind] += int(head == names[c])
                    if r == "softmax" and c < 4:
                        as_object = head in names[4:]
                        split[(background_named, as_object)] += 1
                        if background_named and as_object:
                            called_by["bare noun" if keys[i][j] == head else "coloured phrase"] += 1
n = sum(split.values())
unnamed = (split[(False, True)] + split[(False, False)]) / n
print(f"{n} background patches: background not among the prompts {unnamed:.2f}"
      f" (called an object {split[(False, True)] / n:.2f}); named but called an object {split[(True, True)] / n:.2f};"
      f" named and called a background {split[(True, False)] / n:.2f}")
wrong = sum(called_by.values())
print("named but called an object, by: " + ", ".join(f"{key} {v / max(wrong, 1):.2f}" for key, v in called_by.items()))
for r in rules:
    s = scores[r]
    ratio = {key: s["hit " + key] / max(s["named " + key], 1) for key in ("thing", "stuff")}
    precision = {key: s["right " + key] / max(s["labelled " + key], 1) for key in ("thing", "stuff")}
    print(f"{r:<24} object recall {ratio['thing']:.2f} precision {precision['thing']:.2f} | "
          f"stuff recall {ratio['stuff']:.2f} precision {precision['stuff']:.2f}")
