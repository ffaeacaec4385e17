"""Group purity of a trained GroupViT-style run on the first 128 eval images: for each thing class
in an image, the share of its pixels its main group owns (coverage), the share of that group's pixels
that belong to the class (purity), and (supervised runs) whether that group is classified right.

    python docs/investigation/group_purity.py RUN_FOLDER
"""
import sys

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
from mixreorg.data.synthshapes import SynthShapesEval
from mixreorg.recipes.loading import load_inference_model
from mixreorg.nn.groupvit import assignment_to_image, compose_assignments

model = load_inference_model(sys.argv[1])[0]
model.eval()
ds = SynthShapesEval()
items = ds.__getitems__(list(range(128)))
x = torch.stack([torch.as_tensor(it['image']) for it in items]); m = torch.stack([torch.as_tensor(it['mask']) for it in items]).long()
with torch.no_grad():
    out = model.encode_image(x, return_maps=True)
    maps = assignment_to_image(compose_assignments(out['soft_maps'], torch.float32), out['grid'], (64, 64))
    grp = maps.argmax(1)  # [B,H,W]
    seg = F.normalize(out['seg_embed'], dim=-1)
    cls = model.classifier_embeddings(ds.class_names) if hasattr(model,'classifier_embeddings') else None
cover=[]; purity=[]; right=[]
for b in range(len(items)):
    for c in range(4,10):
        pix = m[b]==c
        if pix.sum()<20: continue
        g = grp[b][pix].mode().values
        cover.append((grp[b][pix]==g).float().mean().item())
        own = grp[b]==g
        purity.append((m[b][own]==c).float().mean().item())
        if cls is not None:
            right.append(int((seg[b,g]@cls.t()).argmax().item()==c))
import statistics as S

print('object coverage by its main group', S.mean(cover), 'purity of that group', S.mean(purity), 'group classified right', S.mean(right) if right else None)
print('groups used per image', torch.tensor([grp[b].unique().numel() for b in range(len(items))]).float().mean().item())
