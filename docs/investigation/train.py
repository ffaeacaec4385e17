"""Investigation harness: tiny CLIP / GroupViT on pre-rendered SynthShapes pools.

python train.py --name X [--arch clip|groupvit] [--loss infonce|sigmoid] [--multipos none|nouns|caption]
                [--ml 0|1] [--steps N] [--time S] ...
Appends one JSON line to runs.jsonl.
"""
from __future__ import annotations

import argparse
import os
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from mixreorg.data.synthshapes import SynthShapes  # noqa: E402
from mixreorg.data.transforms import CLIP_MEAN, CLIP_STD  # noqa: E402
from mixreorg.metrics import ConfusionMatrix  # noqa: E402
from mixreorg.nn.groupvit import GroupViT  # noqa: E402
from mixreorg.text import PROMPT_TEMPLATES, tokenize  # noqa: E402
from mixreorg.nn.groupvit import assignment_to_image, compose_assignments  # noqa: E402
from mixreorg.zeroshot import segment_from_features  # noqa: E402

CLASSES = SynthShapes.CLASS_NAMES
CTX = 32

p = argparse.ArgumentParser()
p.add_argument("--name", required=True)
p.add_argument("--pool", default="default")
p.add_argument("--arch", default="clip")
p.add_argument("--width", type=int, default=128)
p.add_argument("--depth", type=int, default=6)  # clip: blocks
p.add_argument("--depths", default="2,2,2")
p.add_argument("--groups", default="16,4")
p.add_argument("--patch", type=int, default=8)
p.add_argument("--heads", type=int, default=4)
p.add_argument("--soft", type=int, default=0)
p.add_argument("--gumbel", type=int, default=1)
p.add_argument("--twidth", type=int, default=128)
p.add_argument("--tlayers", type=int, default=2)
p.add_argument("--proj", type=int, default=1)  # projection head layers
p.add_argument("--projhid", type=int, default=512)
p.add_argument("--dim", type=int, default=128)
p.add_argument("--loss", default="infonce")
p.add_argument("--multipos", default="none")
p.add_argument("--ml", type=float, default=0.0)  # weight of the multi-label prompt loss
p.add_argument("--mlk", type=int, default=3)
p.add_argument("--mlseg", default="none")  # none | max: multi-label logits = max over segments
p.add_argument("--scale", type=float, default=1 / 0.07)
p.add_argument("--bias", type=float, default=-10.0)
p.add_argument("--mlbias", type=float, default=None)
p.add_argument("--blr", type=float, default=1.0)  # lr multiplier of scales and biases
p.add_argument("--fixscale", type=int, default=0)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--tlr", type=float, default=1.0)  # text lr multiplier
p.add_argument("--wd", type=float, default=0.05)
p.add_argument("--warmup", type=int, default=50)
p.add_argument("--bs", type=int, default=64)
p.add_argument("--steps", type=int, default=400)
p.add_argument("--time", type=float, default=0)  # stop after this many seconds (0: no limit)
p.add_argument("--dp", type=float, default=0.0)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--evalevery", type=int, default=0)
p.add_argument("--note", default="")
args = p.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)

pool = torch.load(os.path.join(os.environ.get("PROBE_DIR", "/tmp/mixreorg_probe"), f"pool_{args.pool}.pt"), weights_only=False)
tr, ev = pool["train"], pool["eval"]
mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255
std = torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255


def norm(x):
    return (x.float() - mean) / std


# noun-set keys
def keyof(nouns):
    return hash(tuple(sorted(nouns)))


tr_keys = torch.tensor([keyof(n) for n in tr["nouns"]])
tr_capkeys = torch.tensor([hash(c) for c in tr["caption"]])
cls_index = {c: i for i, c in enumerate(CLASSES)}
# caption-mentioned classes multi-hot
tr_named = torch.zeros(len(tr["nouns"]), len(CLASSES), dtype=torch.bool)
for i, ns in enumerate(tr["nouns"]):
    for n in ns:
        tr_named[i, cls_index[n]] = True
# prompt table [T, C, CTX]
templ = list(PROMPT_TEMPLATES)
prompt_ids = tokenize([t.format(c) for t in templ for c in CLASSES], context_length=77)[:, :CTX].reshape(
    len(templ), len(CLASSES), CTX
)

# ------------------------------------------------------------------ model
if args.arch == "clip":
    vision = dict(img_size=64, patch_size=args.patch, embed_dim=args.width, num_heads=args.heads,
                  depths=(args.depth,), num_group_tokens=(0,), num_output_groups=(), drop_path_rate=args.dp)
else:
    depths = tuple(int(x) for x in args.depths.split(","))
    groups = tuple(int(x) for x in args.groups.split(","))
    vision = dict(img_size=64, patch_size=args.patch, embed_dim=args.width, num_heads=args.heads,
                  depths=depths, num_group_tokens=groups + (0,), num_output_groups=groups,
                  drop_path_rate=args.dp, hard_assignment=not args.soft, gumbel=bool(args.gumbel))
text = dict(context_length=CTX, width=args.twidth, layers=args.tlayers, heads=4)
model = GroupViT(vision, text, proj_dim=args.dim, proj_hidden=args.projhid, proj_layers=args.proj,
                 logit_scale_init=math.log(args.scale))
bias = nn.Parameter(torch.tensor(args.bias))
mlbias = nn.Parameter(torch.tensor(args.bias if args.mlbias is None else args.mlbias))
if args.fixscale:
    model.logit_scale.requires_grad_(False)
    if model.multi_label_logit_scale is not None:
        model.multi_label_logit_scale.requires_grad_(False)
nparam = sum(p.numel() for p in model.parameters())

decay, no_decay, tdecay, tno = [], [], [], []
for n, q in model.named_parameters():
    if not q.requires_grad:
        continue
    is_text = n.startswith("text.") or n.startswith("text_proj")
    if "logit_scale" in n:
        continue
    if q.ndim <= 1 or n.endswith("pos_embed") or "group_token" in n:
        (tno if is_text else no_decay).append(q)
    else:
        (tdecay if is_text else decay).append(q)
groups_ = [
    dict(params=decay, weight_decay=args.wd, lrm=1.0), dict(params=no_decay, weight_decay=0.0, lrm=1.0),
    dict(params=[bias, mlbias] + [q for n, q in model.named_parameters() if "logit_scale" in n and q.requires_grad],
         weight_decay=0.0, lrm=args.blr),
    dict(params=tdecay, weight_decay=args.wd, lrm=args.tlr), dict(params=tno, weight_decay=0.0, lrm=args.tlr),
]
opt = torch.optim.AdamW(groups_, lr=args.lr, betas=(0.9, 0.999), fused=True)


def lr_at(step, total):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, total - args.warmup)
    return args.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


# ------------------------------------------------------------------ losses
def pair_loss(img, txt, scale, b, pos):
    """img [B,D], txt [M,D], pos [B,M] bool."""
    logits = scale * img @ txt.t()
    if args.loss == "sigmoid":
        logits = logits + b
        z = pos.float() * 2 - 1
        return -F.logsigmoid(z * logits).sum() / img.shape[0]
    t = pos.float()
    li = -(t / t.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    tt = pos.t().float()
    lt = -(tt / tt.sum(1, keepdim=True).clamp(min=1) * logits.t().log_softmax(1)).sum(1)
    lt = lt[tt.sum(1) > 0].mean()
    return 0.5 * (li + lt)


def losses(batch_idx, step):
    x = norm(tr["image"][batch_idx])
    ids = tr["ids"][batch_idx].long()
    ids = ids[:, : int((ids > 0).sum(1).max())]  # causal + EOT pooling: trailing padding is irrelevant
    B = len(batch_idx)
    out = model.encode_image(x, return_maps=args.mlseg != "none")
    img = out["image_embed"]
    txt = model.encode_text(ids)
    scale = model.logit_scale.exp().clamp(max=100)
    if args.multipos == "nouns":
        k = tr_keys[batch_idx]
        pos = k[:, None] == k[None, :]
    elif args.multipos == "caption":
        k = tr_capkeys[batch_idx]
        pos = k[:, None] == k[None, :]
    else:
        pos = torch.eye(B, dtype=torch.bool)
    loss = pair_loss(img, txt, scale, bias, pos)
    logs = dict(itc=loss.item())
    if args.ml > 0:
        # K prompts per image: distinct named nouns (fill with repeats of random named nouns)
        named = tr_named[batch_idx]  # [B, C]
        r = torch.rand(B, len(CLASSES)) + (~named).float() * 10
        pick = r.argsort(1)[:, : args.mlk]  # [B, K] classes (named first)
        nn_ = named.sum(1, keepdim=True)
        j = torch.arange(args.mlk)[None, :]
        pick = torch.where(j < nn_, pick, pick.gather(1, (j % nn_)))
        tidx = torch.randint(len(templ), (B, args.mlk))
        pid = prompt_ids[tidx, pick]  # [B, K, CTX]
        pid = pid.reshape(-1, CTX).long()
        pe = model.encode_text(pid[:, : int((pid > 0).sum(1).max())])  # [B*K, D]
        mls = model.multi_label_scale()
        # positives: image i vs prompt (j,k) if class of prompt is named by i
        pc = pick.reshape(-1)  # [B*K]
        posm = named[:, pc]  # [B, B*K]
        if args.mlseg == "max":
            seg = out["seg_embed"]  # [B, S, D]
            lg = torch.einsum("bsd,md->bsm", seg, pe).max(1).values * mls  # [B, B*K]
            t = posm.float()
            li = -(t / t.sum(1, keepdim=True) * lg.log_softmax(1)).sum(1).mean()
            tt = posm.t().float()
            lt = -(tt / tt.sum(1, keepdim=True).clamp(min=1) * lg.t().log_softmax(1)).sum(1)
            ml = 0.5 * (li + lt[tt.sum(1) > 0].mean())
        else:
            ml = pair_loss(img, pe, mls, mlbias, posm)
        loss = loss + args.ml * ml
        logs["ml"] = ml.item()
    return loss, logs


# ------------------------------------------------------------------ eval
@torch.no_grad()
def evaluate():
    model.eval()
    cm = ConfusionMatrix(len(CLASSES))
    cm5 = ConfusionMatrix(len(CLASSES))
    tids = tokenize([f"a photo of a {c}." for c in CLASSES], context_length=77)[:, :CTX].long()
    temb = model.encode_text(tids)
    scale = model.logit_scale.exp().clamp(max=100)
    r1 = 0
    cls_acc = 0
    for s in range(0, 512, 128):
        x = norm(ev["image"][s : s + 128])
        m = ev["mask"][s : s + 128].long()
        out = model.encode_image(x, return_maps=True)
        B = x.shape[0]
        if args.arch == "clip":
            seg = out["seg_embed"]  # [B, L, D]
            g = int(math.sqrt(seg.shape[1]))
            maps = torch.eye(seg.shape[1]).expand(B, -1, -1)
            maps = F.interpolate(maps.reshape(B, -1, g, g), size=(64, 64), mode="bilinear", align_corners=False)
        else:
            seg = out["seg_embed"]
            maps = assignment_to_image(compose_assignments(out["soft_maps"], torch.float32), out["grid"], (64, 64))
        lg = segment_from_features(seg, out["image_embed"], maps, temb, scale, topk=None)
        cm.update(lg.argmax(1), m)
        lg5 = segment_from_features(seg, out["image_embed"], maps, temb, scale, topk=5)
        cm5.update(lg5.argmax(1), m)
        ce = model.encode_text(ev["ids"][s : s + 128].long())
        r1 += (out["image_embed"] @ ce.t()).argmax(1).eq(torch.arange(B)).sum().item()
        # image-level multi-label: top classes vs labels (AP-ish: precision of top-2)
        sc = out["image_embed"] @ temb.t()
        lab = ev["labels"][s : s + 128]
        top = sc.topk(2, dim=1).indices
        cls_acc += lab.gather(1, top).float().mean(1).sum().item()
    model.train()
    # embedding collapse indicator
    x = norm(ev["image"][:128])
    with torch.no_grad():
        model.eval()
        e = model.encode_image(x)["image_embed"]
        model.train()
    cos = (e @ e.t()).fill_diagonal_(0).sum() / (128 * 127)
    return dict(miou=cm.miou, miou_top5=cm5.miou, pixacc=cm.accuracy, r1=r1 / 512, top2prec=cls_acc / 512,
                cos=cos.item(), iou=[round(v, 3) for v in cm.iou.tolist()])


# ------------------------------------------------------------------ loop
g = torch.Generator().manual_seed(args.seed)
N = tr["image"].shape[0]
perm = torch.randperm(N, generator=g)
t0 = time.time()
c0 = time.process_time()
hist = []
step = 0
total = args.steps
ema = None
while step < total:
    lr = lr_at(step, total)
    for pg in opt.param_groups:
        pg["lr"] = lr * pg["lrm"]
    s = (step * args.bs) % N
    bi = perm[s : s + args.bs]
    loss, logs = losses(bi, step)
    if not math.isfinite(loss.item()):
        print("NaN at", step)
        break
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0).item()
    opt.step()
    ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
    step += 1
    if step % 25 == 0 or step == 1:
        el = time.time() - t0
        print(f"step {step} loss {loss.item():.4f} ema {ema:.4f} {logs} scale {model.logit_scale.exp().item():.2f} "
              f"bias {bias.item():.2f} gn {gn:.2f} {step * args.bs / el:.0f} img/s", flush=True)
    if args.evalevery and step % args.evalevery == 0:
        r = evaluate()
        r.pop("iou")
        print("EVAL", step, r, flush=True)
        hist.append((step, r))
    if args.time and time.time() - t0 > args.time:
        break
el = time.time() - t0
cpu = time.process_time() - c0
res = evaluate()
row = dict(name=args.name, note=args.note, steps=step, secs=round(el, 1), img_s=round(step * args.bs / el, 1),
           img_cpu_s=round(step * args.bs / cpu, 1),
           loss_ema=round(ema, 4), nparam=nparam, args=vars(args), **res)
print(json.dumps(row))
torch.save({"model": model.state_dict(), "args": vars(args)}, os.path.join(os.environ.get("PROBE_DIR", "/tmp/mixreorg_probe"), f"ckpt_{args.name}.pt"))
with open(os.path.join(os.environ.get("PROBE_DIR", "/tmp/mixreorg_probe"), "runs.jsonl"), "a") as f:
    f.write(json.dumps(row) + "\n")
