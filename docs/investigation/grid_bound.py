"""What a perfect segmenter scores on SynthShapes' eval split when its maps live on a token grid.

Each class's area fraction per cell of a g x g grid (the best soft assignment map a grouping model on
that grid could output), upsampled to 64x64 nearest or bilinearly (as zero-shot inference does), argmax:

    python docs/investigation/grid_bound.py
"""

import torch
import torch.nn.functional as F

from mixreorg.data.synthshapes import SynthShapesEval
from mixreorg.metrics import confusion_matrix, iou_from_confusion

ds = SynthShapesEval()
masks = torch.stack([torch.as_tensor(it["mask"]) for it in ds.__getitems__(list(range(len(ds))))]).long()
onehot = F.one_hot(masks, 10).permute(0, 3, 1, 2).float()  # [N, 10, 64, 64]
for g in (4, 8, 16, 32):
    frac = F.avg_pool2d(onehot, 64 // g)
    for mode in ("nearest", "bilinear"):
        kw = {} if mode == "nearest" else {"align_corners": False}
        pred = F.interpolate(frac, size=(64, 64), mode=mode, **kw).argmax(1)
        iou = iou_from_confusion(confusion_matrix(pred, masks, 10))
        print(f"grid {g:2d}x{g:<2d} {mode:8s} mIoU {iou.mean():.3f}  stuff {iou[:4].mean():.3f}  things {iou[4:].mean():.3f}")
