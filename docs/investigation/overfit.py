import torch, time, sys
torch.set_num_threads(1)
from mixreorg.nn import GroupViT, MixReorg
from mixreorg.losses import MixReorgLoss
hard = sys.argv[1] == "hard"; lr = float(sys.argv[2]); steps = int(sys.argv[3])
TV = dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3, depths=(2, 1, 1), num_group_tokens=(8, 4, 0), num_output_groups=(8, 4), drop_path_rate=0.0, hard_assignment=hard, gumbel=hard)
TT = dict(context_length=12, width=48, layers=1, heads=3)
torch.manual_seed(0)
gv = GroupViT(vision=TV, text=TT, proj_dim=32, proj_hidden=64)
m = MixReorg(gv, dict(group_size=4))
g = torch.Generator().manual_seed(0)
colours = torch.rand(16, 3, 1, 1, generator=g) * 2 - 1
images = colours + 0.3 * torch.randn(16, 3, 32, 32, generator=g)
ids = torch.randint(1, 500, (16, 12), generator=g); ids[:, 0], ids[:, -1] = 49406, 49407
pg = torch.Generator().manual_seed(1)
opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0); lf = MixReorgLoss()
t=time.time()
for s in range(steps):
    out = m(images, ids, generator=pg); logs = lf(out); opt.zero_grad(); logs["loss"].backward(); opt.step()
    if s%10==0 or s==steps-1: print(sys.argv[1:], s, round(time.time()-t,1), {k: round(float(v),3) for k,v in logs.items() if k in ("loss","seg/acc","seg/loss","original/itc")}, flush=True)
