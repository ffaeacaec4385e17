"""Zero-shot segmentation read from the first stage's PATCH tokens instead of the groups, on the fixed
512-image eval split: each stage-1 patch token through the image head (``GroupViT.project_patches``)
is labelled with its nearest class prompt, the logits upsampled bilinearly. It tells whether the
patch features the grouping assigns carry the nouns (then the grouping is what loses them) or not.

    python docs/investigation/patch_zeroshot.py RUN_FOLDER [stage1|embed]

(``embed``: the embedded patches before any block, ``objective.patch_label_tokens=embed``.)
"""
import sys

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
from mixreorg.data.synthshapes import SynthShapesEval
from mixreorg.metrics import confusion_matrix, iou_from_confusion
from mixreorg.recipes.evaluation import vocabulary_embeddings
from mixreorg.recipes.loading import load_inference_model

model = load_inference_model(sys.argv[1])[0].eval()
tokens = sys.argv[2] if len(sys.argv) > 2 else "stage1"
ds = SynthShapesEval()
names = list(ds.CLASS_NAMES)
cm = None
with torch.no_grad():
    cls = vocabulary_embeddings(model, names)  # [K, D]
    for start in range(0, 512, 128):
        items = ds.__getitems__(list(range(start, start + 128)))
        x = torch.stack([torch.as_tensor(it["image"]) for it in items])
        m = torch.stack([torch.as_tensor(it["mask"]) for it in items]).long()
        out = model.encode_image(x)
        emb = model.project_patches(out[f"{tokens}_tokens"]).float()  # [B, L, D]
        h, w = out["grid"]
        if h * w != emb.shape[1]:  # a fine-grid encoder reports the 16x16 grid; these tokens are coarser
            h = w = int(round(emb.shape[1] ** 0.5))
        logits = (emb @ cls.t()).transpose(1, 2).reshape(len(items), len(names), h, w)
        pred = F.interpolate(logits, size=m.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
        c = confusion_matrix(pred, m, len(names))
        cm = c if cm is None else cm + c
iou = iou_from_confusion(cm)
print(f"{tokens} patch-level zero-shot mIoU %.3f stuff %.3f things %.3f" % (iou.mean(), iou[:4].mean(), iou[4:].mean()))
print(" ".join(f"{n} {v:.2f}" for n, v in zip(names, iou.tolist())))
