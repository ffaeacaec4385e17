"""``train.schedule_by_time``: under a time limit the warmup and the cosine run on the fraction of the
budget, so the warmup is the first ``warmup_steps / steps`` of it whatever the machine fits."""

from __future__ import annotations

from pathlib import Path

import pytest

from mixreorg.recipes.config import get_preset
from mixreorg.recipes.train import _apply_schedule, _setup


@pytest.mark.parametrize("frac", [0.0, 0.05, 0.1, 0.2, 0.5, 0.9, 1.0])
def test_the_bound_preset_warms_up_over_a_fifth_of_its_budget(tmp_path: Path, frac: float) -> None:
    cfg = get_preset("tiny_hybrid_supervised")
    cfg.train.out_dir = str(tmp_path)
    run = _setup(cfg)
    limit, steps, warm = cfg.train.time_limit, cfg.train.steps, cfg.optim.warmup_steps
    assert warm / steps == pytest.approx(0.2)  # LOG session 15: 8% of the run was too short
    run.elapsed_before = frac * limit - run.elapsed()  # as if frac of the budget had passed, 0 steps taken
    sched = run.schedule

    def expect(elapsed: float) -> float:  # the schedule at the step that fraction of the budget stands for
        return sched.lr(elapsed / limit * steps)

    before = expect(run.elapsed())
    lr = _apply_schedule(run)
    after = expect(run.elapsed())  # the clock runs on during the call: the lr lies between the two
    assert min(before, after) * (1 - 1e-9) <= lr <= max(before, after) * (1 + 1e-9)
    # a fifth of the budget in, the warmup is over, however few steps the machine took
    if 0.2 <= frac < 1.0:
        assert lr <= sched.peak * (1 + 1e-6) and lr > sched.min_lr
