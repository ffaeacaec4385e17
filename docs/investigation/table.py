import json
import os
rows=[json.loads(l) for l in open(os.path.join(os.environ.get("PROBE_DIR", "/tmp/mixreorg_probe"), "runs.jsonl"))]
print("| run | what changed | steps | img/cpu-s | final loss (ema) | r@1 (512) | mIoU (all 10) | mIoU (top-5) | stuff IoU | things IoU |")
print("|---|---|---|---|---|---|---|---|---|---|")
NOTES = {
 "clip_sigmoid": "(2) plain CLIP (ViT 6x128, mean pool, no grouping), SigLIP sigmoid loss, scale 10, bias -10",
 "clip_infonce": "(1) plain CLIP (ViT 6x128, mean pool, no grouping), InfoNCE",
 "gv_infonce_h4": "(5) GroupViT as the probe: 2/2/2 blocks, 16->4 groups, hard, InfoNCE only",
 "gv_infonce_h8": "as above, 16->8 groups",
 "gv_inf_mp_ml_h8": "(3) 16->8, InfoNCE + multi-positive (same nouns) + multi-label prompt loss",
}
for r in rows:
    r["note"] = NOTES.get(r["name"], r.get("note", ""))
    if r["name"]=="smoke": continue
    iou=r["iou"]; st=sum(iou[:4])/4; th=sum(iou[4:])/6
    print(f"| {r['name']} | {r.get('note','')} | {r['steps']} | {r.get('img_cpu_s','')} | {r['loss_ema']:.3f} | {r['r1']:.2f} | {r['miou']:.3f} | {r['miou_top5']:.3f} | {st:.2f} | {th:.3f} |")
