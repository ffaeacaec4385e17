"""Does a zero-shot run recognise the nouns at all? Per class, the ROC AUC over the first 512 eval
images of "the class is in the image" (from the masks) scored by the image embedding's similarity to
the class prompt, and by the best patch's (stage-1 / embedded patches through the image head).
0.5 = chance. If a shape's image-level AUC is near 0.5, no grouping can segment it. It also prints
the mean cosine between the class prompts' text embeddings (stuff-stuff, thing-thing): near 1 means
the text tower has merged those nouns.

    python docs/investigation/noun_auc.py RUN_FOLDER
"""
import sys

import torch

torch.set_num_threads(1)
from mixreorg.data.synthshapes import SynthShapesEval
from mixreorg.recipes.evaluation import vocabulary_embeddings
from mixreorg.recipes.loading import load_inference_model


def auc(score: torch.Tensor, label: torch.Tensor) -> float:
    pos, neg = score[label], score[~label]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return ((pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean()).item()


model = load_inference_model(sys.argv[1])[0].eval()
ds = SynthShapesEval()
names = list(ds.CLASS_NAMES)
scores = {"image": [], "stage1": [], "embed": [], "segment": []}
labels = []
with torch.no_grad():
    cls = vocabulary_embeddings(model, names)  # [K, D]
    for start in range(0, 512, 128):
        items = ds.__getitems__(list(range(start, start + 128)))
        x = torch.stack([torch.as_tensor(it["image"]) for it in items])
        m = torch.stack([torch.as_tensor(it["mask"]) for it in items]).long()
        labels.append(torch.stack([(m == c).flatten(1).any(1) for c in range(len(names))], 1))
        out = model.encode_image(x, return_maps=True)
        scores["image"].append(out["image_embed"].float() @ cls.t())
        scores["segment"].append((out["seg_embed"].float() @ cls.t()).amax(1))
        for t in ("stage1", "embed"):
            scores[t].append((model.project_patches(out[f"{t}_tokens"]).float() @ cls.t()).amax(1))
lab = torch.cat(labels)
for key, s in scores.items():
    s = torch.cat(s)
    a = [auc(s[:, c], lab[:, c]) for c in range(len(names))]
    print(f"{key:8s} AUC things {sum(a[4:]) / 6:.3f} | " + " ".join(f"{n} {v:.2f}" for n, v in zip(names, a)))
sim = cls @ cls.t()
mean_off = lambda s: ((s.sum() - s.diagonal().sum()) / (s.numel() - len(s))).item()  # noqa: E731
print(f"prompt cosine: stuff-stuff {mean_off(sim[:4, :4]):.3f} thing-thing {mean_off(sim[4:, 4:]):.3f}")
