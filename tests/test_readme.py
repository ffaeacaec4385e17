"""The README's API examples run: every ```python block of README.md is read from the file (not
copied here) and executed as it stands, one test case per block (id: the line of its first code
line), then what its comments promise is checked on the names it made.

An example may read names it does not define (``model``, ``images``, ``captions``...): the setup
matched to it (by a line that identifies it, see ``SETUPS``) gives it small real objects of the
right kind and size. A block no setup matches runs in an empty namespace, so a new self-contained
example is tested without touching this file and one that needs names fails until it gets a setup.
No example needs an allow-list: none downloads anything or needs a GPU (``timm.create_model``
builds an untrained ViT), and the one with an endless loop is ended by the scheduler it is given.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mixreorg.checkpoint import CheckpointManager, load_checkpoint
from mixreorg.nn import GroupViT
from mixreorg.recipes.config import get_preset
from mixreorg.recipes.scheduler import WarmupCosine
from mixreorg.text import tokenize

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^\s`]*)")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line of the first code line, code)`` of every fenced block tagged python (or py)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group("fence"), m.group("info").lower()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if end == len(lines):
            raise ValueError(f"README.md:{i + 1}: code block never closed")
        if info in ("python", "py"):
            blocks.append((i + 2, "\n".join(lines[i + 1 : end])))
        i = end + 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- setups
def tiny_groupvit() -> GroupViT:
    """A GroupViT small enough for CPU (32 px, patch 8) with the CLIP context of 77 tokens."""
    return GroupViT(
        vision=dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2, depths=(1, 1, 1),
                    num_group_tokens=(4, 2, 0), num_output_groups=(4, 2)),
        text=dict(width=32, layers=1, heads=2),
        proj_dim=16,
        proj_hidden=32,
    )  # fmt: skip


CAPTIONS = ["a red circle on grass.", "a blue square and a star in the sky.", "a ring on sand.", "a cross."]


class ExampleStopped(Exception):
    """Raised by the scheduler given to the data example to end its loop over an endless stream."""


class StoppingSchedule:
    """A real :class:`WarmupCosine` whose ``state_dict`` (read once per checkpoint) raises
    :class:`ExampleStopped` after ``saves`` checkpoints."""

    def __init__(self, optimizer: torch.optim.Optimizer, saves: int) -> None:
        self.inner = WarmupCosine(optimizer, peak=1e-3, warmup_lr=0.0, min_lr=1e-5, warmup_steps=1, total_steps=10)
        self.saves, self.calls = saves, 0

    def state_dict(self) -> dict[str, Any]:
        if self.calls == self.saves:
            raise ExampleStopped
        self.calls += 1
        return self.inner.state_dict()


def timm_names(tmp: Path) -> dict[str, Any]:
    # group_size=8: a batch of 8 images at the ViT's 224 px, 10 classes
    return dict(F=F, images=torch.randn(8, 3, 224, 224), targets=torch.randint(0, 10, (8,)))


def mixreorg_names(tmp: Path) -> dict[str, Any]:
    # group_size=16: a batch of 16; 32 px (2x2 patches of 16) keeps the full-size GroupViT quick
    captions = [CAPTIONS[i % 4] for i in range(16)]
    return dict(
        images=torch.randn(16, 3, 32, 32),
        token_ids=tokenize(captions),
        prompt_ids=tokenize([p for c in captions for p in (c, f"a photo of {c}")]).reshape(16, 2, -1),
    )


def zeroshot_names(tmp: Path) -> dict[str, Any]:
    return dict(model=tiny_groupvit(), images=torch.randn(2, 3, 32, 32), captions=CAPTIONS[:2])


def backbone_names(tmp: Path) -> dict[str, Any]:
    # 64 px: a multiple of both examples' patch sizes (16 for GroupViT(), 8 for the encoder)
    return dict(
        images=torch.randn(2, 3, 64, 64),
        token_ids=tokenize(CAPTIONS[:2]),
        class_ids=tokenize(["circle", "square", "sky"]),
    )


def data_names(tmp: Path) -> dict[str, Any]:
    model = tiny_groupvit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return dict(torch=torch, model=model, opt=opt, sched=StoppingSchedule(opt, saves=3), cfg=get_preset("tiny"))


# what each example reads but does not define, keyed by a line that identifies the example
SETUPS: dict[str, Callable[[Path], dict[str, Any]]] = {
    'vit = timm.create_model("vit_small_patch16_224"': timm_names,
    "model = MixReorg(GroupViT(),": mixreorg_names,
    'ids = tokenize(["a photo of a cat."])': zeroshot_names,
    "vis = GroupViTVisionEncoder(": backbone_names,
    "stream = SynthShapesStream(": data_names,
}


# ---------------------------------------------------------------------------------------------- checks
def check_mixing(ns: dict[str, Any], tmp: Path) -> None:
    assert torch.equal(ns["restored"], ns["tokens"])  # "== tokens, bit for bit"
    assert ns["plan"].labels.shape == (64, 196)
    assert ns["plan"].pixel_labels(16).shape == (64, 224, 224)
    assert ns["enhanced"].shape == ns["tokens"].shape


def check_timm(ns: dict[str, Any], tmp: Path) -> None:
    assert ns["out"].logits.shape == (8, 10) and ns["out"].plan.labels.shape == (8, 196)
    assert math.isfinite(float(ns["loss"].detach()))


def check_mixreorg(ns: dict[str, Any], tmp: Path) -> None:
    assert math.isfinite(float(ns["logs"]["loss"].detach())) and "seg/acc" in ns["logs"]
    assert all(p.grad is not None for p in ns["model"].parameters() if p.requires_grad)


def check_zeroshot(ns: dict[str, Any], tmp: Path) -> None:
    assert ns["ids"].shape == (1, 77)
    assert ns["ids"][0, :9].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407, 0]
    assert math.isfinite(float(ns["loss"].detach()))
    assert ns["T"].shape == (3, 16)
    assert ns["logits"].shape == (2, 1 + 3, 32, 32)
    assert ns["probs"].shape == (2, 3) and torch.allclose(ns["probs"].sum(-1), torch.ones(2))


def check_backbone(ns: dict[str, Any], tmp: Path) -> None:
    assert ns["out"]["image_embed"].shape == (2, 256) and ns["out"]["text_embed"].shape == (2, 256)
    assert ns["enc"]["seg_embed"].shape == (2, 8, 256)
    assert ns["logits"].shape == (2, 3, 64, 64)
    assert ns["r"]["tokens"].shape == (2, 4, 128) and ns["r"]["pooled"].shape == (2, 128)


def check_data(ns: dict[str, Any], tmp: Path) -> None:
    manager = CheckpointManager(tmp / "runs/demo/checkpoints")
    assert [step for step, _ in manager.checkpoints()] == [0, 1, 2]
    saved = load_checkpoint(manager.latest())
    assert saved["step"] == 2 and saved["config"]["preset"] == "tiny"
    ns["stream"].load_state_dict(saved["data"])  # the position the example saved restores


# what the comments of each example promise (keyed as SETUPS)
CHECKS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "mixer = MixedPatchMixer(group_size=16": check_mixing,
    'vit = timm.create_model("vit_small_patch16_224"': check_timm,
    "model = MixReorg(GroupViT(),": check_mixreorg,
    'ids = tokenize(["a photo of a cat."])': check_zeroshot,
    "vis = GroupViTVisionEncoder(": check_backbone,
    "stream = SynthShapesStream(": check_data,
}
# examples that end by an exception of their setup's making (the endless data loop)
ENDS_WITH = {"stream = SynthShapesStream(": ExampleStopped}


def _key(code: str, table: dict[str, Any]) -> str | None:
    found = [k for k in table if k in code]
    assert len(found) <= 1, f"several keys match one block: {found}"
    return found[0] if found else None


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_readme_has_python_examples_and_every_setup_matches_one() -> None:
    assert len(BLOCKS) >= 6
    codes = [code for _, code in BLOCKS]
    for table in (SETUPS, CHECKS, ENDS_WITH):
        for key in table:
            assert sum(key in code for code in codes) == 1, f"no single README block has {key!r}"


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_example_runs(
    line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    monkeypatch.chdir(tmp_path)  # files an example writes (runs/demo/...) land in the test's folder
    torch.manual_seed(0)
    setup = _key(code, SETUPS)
    namespace: dict[str, Any] = {"__name__": f"readme_example_{line}"}
    if setup is not None:
        namespace.update(SETUPS[setup](tmp_path))
    # padded to its place in the file: tracebacks name (and show) the README's own lines
    compiled = compile("\n" * (line - 1) + code, str(README), "exec")
    end = _key(code, ENDS_WITH)
    if end is None:
        exec(compiled, namespace)
    else:
        with pytest.raises(ENDS_WITH[end]):
            exec(compiled, namespace)
    check = _key(code, CHECKS)
    if check is not None:
        CHECKS[check](namespace, tmp_path)
