"""How right the caption-grounded teacher is: on training-stream batches (SynthShapes seed 1000, not
the training seed), each stage-1 patch's label over its image's own noun prompts (what the grounded
terms teach; :func:`mixreorg.losses.grounded.teacher_labels`), mapped to the prompt's head noun,
against the class that covers most of the patch.

    python docs/investigation/teacher_acc.py RUN_FOLDER|CHECKPOINT [batches] [--ema] [--labels soft|cam]
        [--threshold T] [--prompts K] [--tokens stage1|embed]

Printed: ``thing`` / ``stuff`` (and per class): the share of the patches of a class the caption names
that get that class (the recall the session-12 tables call "right"); ``precision``: the share of
the patches labelled as a thing (stuff) that show it; ``labelled``: the share of all patches given
a label (``cam`` leaves some unlabelled).

``--ema``: score the run's EMA teacher (``objective.grounded_teacher=ema``, the ``teacher.module``
weights of its last checkpoint) instead of the trained model. ``--labels`` / ``--threshold``: the
labelling rule (default: the run's own ``objective.grounded_labels`` / ``grounded_cam_threshold``).
``--prompts K``: build K prompts per image (default the run's ``data.num_prompts``; with fewer prompts
than nouns and phrases the draw can leave a noun out, and its patches cannot be named).
``--tokens``: which patches teach (default the run's ``objective.patch_label_tokens``): the stage-1
tokens after their blocks, or the embedded patches before any block.
"""
import argparse
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
from mixreorg.data.synthshapes import SynthShapes, SynthShapesStream
from mixreorg.losses.grounded import teacher_labels
from mixreorg.recipes.data import BatchBuilder
from mixreorg.recipes.loading import load_inference_model

parser = argparse.ArgumentParser()
parser.add_argument("run")
parser.add_argument("batches", nargs="?", type=int, default=4)
parser.add_argument("--ema", action="store_true")
parser.add_argument("--labels", choices=["soft", "cam"])
parser.add_argument("--threshold", type=float)
parser.add_argument("--prompts", type=int)
parser.add_argument("--tokens", choices=["stage1", "embed"])
args = parser.parse_args()
model, _, cfg = load_inference_model(args.run, with_config=True)
if args.ema:
    given = Path(args.run)
    last = given if given.is_file() else sorted((given / "checkpoints").glob("ckpt-*.pt"))[-1]
    state = torch.load(last, map_location="cpu", weights_only=False)
    state = state.get("model", state)
    teacher = {k[len("teacher.module."):]: v for k, v in state.items() if k.startswith("teacher.module.")}
    if not teacher:
        raise SystemExit(f"{last} holds no EMA teacher (teacher.module.*)")
    model.load_state_dict(teacher)
model.eval()
rule = args.labels or getattr(cfg.objective, "grounded_labels", "soft")
threshold = args.threshold if args.threshold is not None else getattr(cfg.objective, "grounded_cam_threshold", 0.7)
tokens = args.tokens or getattr(cfg.objective, "patch_label_tokens", "stage1")
if args.prompts:
    cfg.data.num_prompts = args.prompts
stream = iter(SynthShapesStream(64, seed=1000, image_size=cfg.data.image_size))
builder = BatchBuilder(cfg, context_length=cfg.model.text["context_length"])
names = list(SynthShapes.CLASS_NAMES)
kind_of = lambda c: "thing" if c >= 4 else "stuff"  # noqa: E731 (SynthShapes: 4 stuff classes, then things)
hits, total, labelled_as, right_as = Counter(), Counter(), Counter(), Counter()
n_patches = n_labelled = 0
with torch.no_grad():
    for step in range(args.batches):
        raw = next(stream)
        batch = builder(raw, step=step)
        out = model.encode_image(batch["images"])
        patch = model.project_patches(out[f"{tokens}_tokens"]).float()  # [B, L, D] normalised
        b, k, t = batch["prompts"].shape
        prompts = F.normalize(model.encode_text(batch["prompts"].reshape(b * k, t)).float().reshape(b, k, -1), dim=-1)
        # any scale: the softmax's argmax and the cam rule do not depend on it
        labels = teacher_labels(patch, prompts, batch["prompt_mask"], 1 / 0.07, rule, threshold)  # [B, L, K]
        has, choice = labels.sum(-1) > 0, labels.argmax(-1)  # [B, L]
        h = int(round(patch.shape[1] ** 0.5))
        onehot = F.one_hot(torch.as_tensor(raw["mask"]).long(), 10).permute(0, 3, 1, 2).float()
        major = F.adaptive_avg_pool2d(onehot, h).flatten(2).argmax(1)  # [B, L] majority class per patch
        heads = batch["keys"]["prompt_head"]
        for i in range(b):
            said = {names.index(hd) for hd, ok in zip(heads[i], batch["prompt_mask"][i].tolist()) if ok and hd in names}
            for l in range(h * h):
                c = int(major[i, l])
                n_patches += 1
                head = heads[i][int(choice[i, l])] if has[i, l] else None
                if head in names:
                    n_labelled += 1
                    labelled_as[kind_of(names.index(head))] += 1
                    right_as[kind_of(names.index(head))] += int(head == names[c])
                if c not in said:
                    continue
                for key in (kind_of(c), names[c]):
                    total[key] += 1
                    hits[key] += int(head == names[c])
print(f"rule {rule}" + (f" (threshold {threshold})" if rule == "cam" else "") + f", {cfg.data.num_prompts} prompts, "
      f"{tokens} tokens")
print(" ".join(f"{key} {hits[key] / max(total[key], 1):.2f} (n={total[key]})" for key in ["thing", "stuff"] + names))
print(" ".join(f"{kind} precision {right_as[kind] / max(labelled_as[kind], 1):.2f} (n={labelled_as[kind]})"
               for kind in ("thing", "stuff")) + f" labelled {n_labelled / max(n_patches, 1):.2f}")
