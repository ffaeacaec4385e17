"""The tiny recipe's train step, side by side in one run, every case timed ALTERNATELY (slow drifts of
the machine's load hit all alike; best of the rounds after a warm-up round):

* our GroupViT vs ``transformers.GroupViTModel`` on the same config and weights (the tiny preset's
  towers with HF's two-layer heads and mean pooling, the forms HF can express), same CLIP loss, in
  float32 and (where the CPU has native bf16) both under the same CPU bf16 autocast;
* the recipe's trainer models (GroupViT and MixReorg with the tiny preset's objective, real batches
  of the recipe's data path): eager (token rows trimmed, as the loop does by default), eager on rows
  padded to the context, ``torch.compile`` (Inductor; padded rows, as ``train.compile`` runs it),
  and, where the CPU has native bf16, eager under CPU bf16 autocast (``train.cpu_bf16``); each
  steps with the recipe's optimiser (fused AdamW); the run ends with issue 11's goals and verdicts;
* SDPA's kernel x precision (``test_cpu_bf16_attention_kernels``): both trainer models' eager step in
  float32 and under CPU bf16 autocast, each with SDPA's default CPU kernel and with its math kernel
  (``mixreorg.nn.attention.SDPA_KERNELS`` set per case): the measurement behind that table's choice;
* ``data.prefetch``: steps/s of the whole training loop (``train()``) with and without the thread;
* the main job's step (``test_main_job_step_variants``, ``tiny_grounded_mixreorg``) against variants
  that each drop one of its costs (the grounded terms, the per-patch prompt term, the 16x16 grouping).

    python -m pytest benchmarks/bench_step.py -s
    python -m pytest benchmarks/bench_step.py -s -k attention_kernels   # the kernel x precision table
    python -m pytest benchmarks/bench_step.py -s -k main_job            # the main job's step and its costs

The compiled cases' first call (Dynamo + AOTAutograd + Inductor's C++ build) is printed apart.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _report import RESULTS

from mixreorg.nn import GroupViT, attention
from mixreorg.nn.weights import config_to_hf, ours_to_hf
from mixreorg.recipes.config import apply_overrides, get_preset
from mixreorg.recipes.data import BatchBuilder, build_stream
from mixreorg.recipes.models import build_model
from mixreorg.recipes.scheduler import build_optimizer
from mixreorg.recipes.train import cpu_bf16_support, train

ROUNDS = 6  # round 0 warms up (and compiles)
MODEL, GV, MR = "GroupViT model step (CLIP loss)", "GroupViT tiny recipe step", "MixReorg tiny recipe step"


def _recipe(preset: str, overrides: dict | None = None):
    cfg = get_preset(preset)
    apply_overrides(cfg, {"train.threads": 0, **(overrides or {})})
    return cfg.validate()


def _interleaved_best(cases: dict) -> dict:
    """Best time of each case over ``ROUNDS - 1`` rounds after a warm-up round, the cases called
    alternately (forward, then backward order) so that slow drifts of the machine hit all alike."""
    best = {key: math.inf for key in cases}
    keys = list(cases)
    for r in range(ROUNDS):
        for key in keys if r % 2 == 0 else keys[::-1]:
            t = time.perf_counter()
            cases[key]()
            if r > 0:  # round 0 warms up
                best[key] = min(best[key], time.perf_counter() - t)
    return best


def _batches(cfg, fixed_length: bool, n: int) -> list[dict]:
    stream = build_stream(cfg, cfg.train.batch_size, rank=0, world=1)
    builder = BatchBuilder(cfg, cfg.model.text["context_length"], fixed_length=fixed_length)
    it = iter(stream)
    return [builder(next(it), step) for step in range(n)]


class _TrainerCase:
    """One trainer model with its optimiser, stepping through its own copy of the batches."""

    def __init__(self, cfg, batches: list[dict], compiled: bool = False, bf16: bool = False,
                 sdpa_kernels: dict | None = None) -> None:
        torch.manual_seed(0)
        self.model = build_model(cfg).train()
        self.forward = torch.compile(self.model) if compiled else self.model
        self.opt = build_optimizer(self.model, cfg)[0]  # the recipe's (fused) AdamW: part of its step
        self.batches, self.i, self.bf16 = batches, 0, bf16
        self.sdpa_kernels = sdpa_kernels  # None: the library's table as it is

    def __call__(self) -> None:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        prepare = getattr(self.model, "prepare_batch", None)
        batch = prepare(batch) if prepare is not None else batch
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with _sdpa_kernels(self.sdpa_kernels), autocast:
            loss = self.forward(batch)["loss"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # the forward chose the kernel; its backward follows
        self.opt.step()


@contextlib.contextmanager
def _sdpa_kernels(table: dict | None):
    """``attention.SDPA_KERNELS`` replaced by ``table`` inside (``None``: left as it is)."""
    if table is None:
        yield
        return
    saved = dict(attention.SDPA_KERNELS)
    attention.SDPA_KERNELS.clear()
    attention.SDPA_KERNELS.update(table)
    try:
        yield
    finally:
        attention.SDPA_KERNELS.clear()
        attention.SDPA_KERNELS.update(saved)


def _clip_loss(img: torch.Tensor, txt: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    logits = log_scale.exp().clamp(max=100) * img @ txt.t()
    labels = torch.arange(img.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def _hf_pair(cfg):
    """Our GroupViT and HF's GroupViTModel holding the same weights (the tiny preset's towers)."""
    from transformers import GroupViTConfig, GroupViTModel

    kwargs = dict(vision={**cfg.model.vision, "img_size": cfg.data.image_size}, text=dict(cfg.model.text),
                  proj_dim=cfg.model.proj_dim, proj_hidden=cfg.model.proj_hidden, proj_layers=2)
    torch.manual_seed(0)
    ours = GroupViT(**kwargs).train()
    hf = GroupViTModel(GroupViTConfig(**config_to_hf(kwargs))).train()
    hf.load_state_dict(ours_to_hf(ours), strict=True)
    return ours, hf


def _model_step(net, hf: bool, batch: dict, opt, bf16: bool = False) -> None:
    images, ids = batch["images"], batch["text"]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:  # the same autocast for both implementations: a like-for-like precision
        if hf:
            out = net(input_ids=ids, pixel_values=images)
            loss = _clip_loss(out.image_embeds.float(), out.text_embeds.float(), net.logit_scale)
        else:
            out = net(images, ids)
            loss = _clip_loss(out["image_embed"].float(), out["text_embed"].float(), out["logit_scale"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _cases() -> dict[tuple[str, str], object]:
    gv_cfg, mr_cfg = _recipe("tiny"), _recipe("tiny_mixreorg")
    trimmed, padded = _batches(gv_cfg, False, 4), _batches(gv_cfg, True, 4)
    ours, hf = _hf_pair(gv_cfg)
    opts = {"ours": torch.optim.AdamW(ours.parameters(), lr=1e-4), "hf": torch.optim.AdamW(hf.parameters(), lr=1e-4)}
    gv, mr, model = GV, MR, MODEL
    cases = {
        (model, "ours"): lambda: _model_step(ours, False, padded[0], opts["ours"]),
        (model, "transformers"): lambda: _model_step(hf, True, padded[0], opts["hf"]),
        (gv, "eager"): _TrainerCase(gv_cfg, trimmed),
        (gv, "eager, padded"): _TrainerCase(gv_cfg, padded),
        (gv, "compiled"): _TrainerCase(gv_cfg, padded, compiled=True),
        (mr, "eager"): _TrainerCase(mr_cfg, _batches(mr_cfg, False, 4)),
        (mr, "compiled"): _TrainerCase(mr_cfg, _batches(mr_cfg, True, 4), compiled=True),
    }
    if cpu_bf16_support()[0]:
        cases[(model, "ours bf16")] = lambda: _model_step(ours, False, padded[0], opts["ours"], bf16=True)
        cases[(model, "transformers bf16")] = lambda: _model_step(hf, True, padded[0], opts["hf"], bf16=True)
        cases[(gv, "eager bf16")] = _TrainerCase(gv_cfg, trimmed, bf16=True)
        cases[(mr, "eager bf16")] = _TrainerCase(mr_cfg, _batches(mr_cfg, False, 4), bf16=True)
    return cases


def _goals(best: dict[tuple[str, str], float]) -> list[str]:
    """Issue 11's goals read off one run's best times: each line the ratio, its goal and the verdict."""
    gv, mr, model = GV, MR, MODEL
    fastest = "eager bf16" if (gv, "eager bf16") in best else "eager"
    lines = []

    def goal(text: str, value: float, target: float, at_most: bool = False) -> None:
        met = value <= target if at_most else value >= target
        sign, verdict = "<=" if at_most else ">=", "met" if met else "NOT met"
        lines.append(f"  {text}: {value:.2f}x (goal {sign} {target}x: {verdict})")

    goal(f"GroupViT recipe step, {fastest} vs eager float32 (today's)", best[(gv, "eager")] / best[(gv, fastest)], 1.6)
    if (mr, fastest) in best:
        goal(f"MixReorg recipe step, {fastest} vs eager float32", best[(mr, "eager")] / best[(mr, fastest)], 1.6)
    ours = "ours bf16" if (model, "ours bf16") in best else "ours"
    goal(f"model step, {ours} vs transformers float32 (its default)",
         best[(model, "transformers")] / best[(model, ours)], 1.5)
    if (model, "transformers bf16") in best:
        goal("model step, ours bf16 vs transformers bf16 (same autocast)",
             best[(model, "transformers bf16")] / best[(model, "ours bf16")], 1.5)
    goal("MixReorg / GroupViT recipe step, eager float32", best[(mr, "eager")] / best[(gv, "eager")], 1.6, at_most=True)
    if (mr, "eager bf16") in best:
        goal("MixReorg / GroupViT recipe step, eager bf16", best[(mr, "eager bf16")] / best[(gv, "eager bf16")],
             1.6, at_most=True)
    return lines


def test_train_steps_side_by_side(capsys):
    cases = _cases()
    best = {key: math.inf for key in cases}
    first: dict[tuple[str, str], float] = {}
    keys = list(cases)
    for r in range(ROUNDS):
        for key in keys if r % 2 == 0 else keys[::-1]:
            t = time.perf_counter()
            cases[key]()
            dt = time.perf_counter() - t
            if r == 0:
                first[key] = dt
            else:
                best[key] = min(best[key], dt)
    model = MODEL
    baselines = {(model, "ours"): "transformers", (model, "transformers bf16"): "transformers",
                 (model, "ours bf16"): "transformers bf16"}
    batch = get_preset("tiny").train.batch_size
    with capsys.disabled():
        print(f"\ntrain steps, B={batch}, {torch.get_num_threads()} threads, best of {ROUNDS - 1} interleaved rounds")
        print(f"{'case':<34} {'impl':<14} {'ms/step':>9} {'steps/s':>8} {'vs baseline':>12} {'1st call s':>11}")
        for (case, impl), t in best.items():
            baseline = baselines.get((case, impl), "transformers" if case == model else "eager")
            RESULTS.append(dict(case=case, impl=impl, mean=t, bytes=0, baseline=baseline))
            print(f"{case:<34} {impl:<14} {t * 1e3:>9.0f} {1 / t:>8.2f} {best[(case, baseline)] / t:>11.2f}x "
                  f"{first[(case, impl)]:>11.1f}")
        print("issue 11's goals, from this run:")
        print("\n".join(_goals(best)))
    assert all(math.isfinite(t) and t > 0 for t in best.values())


def test_cpu_bf16_attention_kernels(capsys):
    """Both trainer models' eager step: float32 / CPU bf16 autocast x SDPA's default CPU kernel / its
    math kernel, all eight cases timed alternately; ratios to float32 with the default kernel."""
    if not cpu_bf16_support()[0]:
        pytest.skip(f"no native bf16 on this CPU ({cpu_bf16_support()[1]}): bf16 autocast is emulated")
    variants = {  # name -> (bf16 autocast, SDPA_KERNELS for the case)
        "fp32, SDPA default": (False, {}),
        "fp32, SDPA math": (False, {("cpu", torch.float32): "math"}),
        "bf16, SDPA default": (True, {}),
        "bf16, SDPA math": (True, {("cpu", torch.bfloat16): "math"}),
    }
    cases = {}
    for preset, model in (("tiny", "GroupViT"), ("tiny_mixreorg", "MixReorg")):
        cfg = _recipe(preset)
        batches = _batches(cfg, False, 4)  # trimmed rows, as the loop runs by default
        for name, (bf16, table) in variants.items():
            cases[(model, name)] = _TrainerCase(cfg, batches, bf16=bf16, sdpa_kernels=table)
    best = _interleaved_best(cases)
    library = {name: attention.sdpa_kernel_for("cpu", dtype) for name, dtype in
               (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    with capsys.disabled():
        print(f"\ntrain step, SDPA kernel x precision, B={get_preset('tiny').train.batch_size}, "
              f"{torch.get_num_threads()} threads, best of {ROUNDS - 1} interleaved rounds "
              f"(ms/step, ratio to fp32 with SDPA's default kernel)")
        print(f"{'model':<10}" + "".join(f"{name:>22}" for name in variants))
        for model in ("GroupViT", "MixReorg"):
            base = best[(model, "fp32, SDPA default")]
            cells = [f"{best[(model, n)] * 1e3:.0f} ms {base / best[(model, n)]:.2f}x" for n in variants]
            print(f"{model:<10}" + "".join(f"{c:>22}" for c in cells))
            for name in variants:
                RESULTS.append(dict(case=f"{model} tiny recipe step, SDPA kernel", impl=name,
                                    mean=best[(model, name)], bytes=0, baseline="fp32, SDPA default"))
        print(f"library's choice (attention.SDPA_KERNELS): {library}")
    assert all(math.isfinite(t) and t > 0 for t in best.values())


def test_prefetch_steps_per_second(tmp_path: Path, capsys):
    """The whole loop (``train()``, tiny preset, no eval), runs with and without the prefetch thread
    alternately; steps/s over the loop's training time, best of the runs."""
    steps, runs = 8, 3
    best = {0: 0.0, 2: 0.0}
    for r in range(runs):
        for prefetch in (0, 2) if r % 2 == 0 else (2, 0):
            cfg = _recipe("tiny")
            apply_overrides(cfg, {"train.steps": steps, "train.time_limit": 0, "train.save_every": 0,
                                  "optim.warmup_steps": 2, "data.prefetch": prefetch,
                                  "train.out_dir": str(tmp_path / f"r{r}_p{prefetch}")})
            summary = train(cfg, resume=False, evaluate_at_end=False, quiet=True)
            best[prefetch] = max(best[prefetch], steps / summary["train_time_s"])
    with capsys.disabled():
        print(f"\ntrain() loop, tiny preset, {steps} steps, {torch.get_num_threads()} threads, best of {runs}: "
              f"prefetch 0: {best[0]:.2f} steps/s, prefetch 2: {best[2]:.2f} steps/s ({best[2] / best[0]:.2f}x)")
    assert best[0] > 0 and best[2] > 0


MAIN_JOB_VARIANTS = {  # name -> overrides of the main job's preset (scripts/main.sh)
    "the preset": {},
    "both grounded terms off": {"objective.grounded_seg_weight": 0.0, "model.mixreorg.mixed_grounded_weight": 0.0},
    "+ patch_label_weight=0": {"objective.grounded_seg_weight": 0.0, "model.mixreorg.mixed_grounded_weight": 0.0,
                               "objective.patch_label_weight": 0.0},
    "group_patch_size=8 (8x8 grouping)": {"model.vision.group_patch_size": 8},
}


def test_main_job_step_variants(capsys):
    """The main job's trainer step (``tiny_grounded_mixreorg``, in bf16 where the CPU has it, as the
    recipe's ``train.cpu_bf16=auto``) against variants that drop a cost: the grounded terms, the
    per-patch prompt term, the 16x16 first grouping; every variant timed alternately."""
    bf16 = cpu_bf16_support()[0]
    cases = {}
    for name, overrides in MAIN_JOB_VARIANTS.items():
        cfg = _recipe("tiny_grounded_mixreorg", overrides)
        cases[name] = _TrainerCase(cfg, _batches(cfg, False, 3), bf16=bf16)
    best = _interleaved_best(cases)
    base = best["the preset"]
    with capsys.disabled():
        print(f"\nmain job step (tiny_grounded_mixreorg, {'bf16' if bf16 else 'float32'}), "
              f"{torch.get_num_threads()} threads, best of {ROUNDS - 1} interleaved rounds")
        for name, t in best.items():
            RESULTS.append(dict(case="main job step", impl=name, mean=t, bytes=0, baseline="the preset"))
            print(f"  {name:<36} {t * 1e3:>7.0f} ms {base / t:>6.2f}x")
    assert all(math.isfinite(t) and t > 0 for t in best.values())
