"""One readable pretraining configuration: nested dataclasses, named presets, command-line overrides.

Presets (:data:`PRESETS`, ``--preset NAME``):

* ``tiny`` (default): the CPU demo -- a tiny GroupViT on the embedded SynthShapes set, sized to
  pretrain in about 6 minutes on 2 CPU cores (the recipe chosen by the measurements recorded in
  the project's investigation log; see the ``tiny`` preset's comments).
* ``tiny_mixreorg``: the same with ``model.name="mixreorg"`` (the MixReorg encoder, identical
  objective, data and schedule).
* ``tiny_hybrid`` / ``tiny_hybrid_mixreorg``: the same on the hybrid backbone (a convolutional trunk
  under the GroupViT stages, the first grouping on a 16x16 grid), the backbone whose supervised
  bound learns the shapes (see the preset's comments); ``tiny_hybrid_supervised``: its supervised
  upper bound (``--model supervised``) in 5 minutes of training.
* ``tiny_grounded`` / ``tiny_grounded_mixreorg``: ``tiny_hybrid`` with the objective that tells the
  grouping where the caption's nouns are (phrase prompts, the per-patch prompt term and the
  caption-grounded segmentation term; see the preset's comments); the MixReorg twin also names its
  mixed images by their sources' nouns, and is the main job's (``scripts/main.sh``).
* ``groupvit_cc12m`` / ``mixreorg_cc12m``: the papers' settings (GroupViT-S, 224 px, batch 4096,
  lr 1.6e-3, 30 epochs of CC12M with 2 warmup epochs, softmax InfoNCE + multi-label loss).

Overrides: ``--set section.key=value`` (values parsed as JSON when they parse, else strings:
``--set optim.lr=5e-4 --set model.vision.depths=[2,2,2]``) and a few explicit flags in
:mod:`mixreorg.recipes.pretrain`. The resolved config is saved as JSON next to every checkpoint
(``config.json``) and inside it; resuming checks it against the saved one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DataConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "TrainConfig",
    "EvalConfig",
    "PretrainConfig",
    "PRESETS",
    "get_preset",
    "apply_overrides",
    "parse_override",
    "config_from_dict",
]


@dataclass
class DataConfig:
    """Where the image-caption pairs come from and how they are prepared.

    source: ``"synthshapes"`` (embedded, infinite, needs nothing), ``"folder"`` (images + same-stem
        ``.txt`` captions under ``path``), ``"csv"`` (a CSV/TSV table at ``path``) or
        ``"webdataset"`` (tar shards: a path, folder, glob or brace pattern in ``path``).
    image_size: training resolution.
    augment: ``"none"`` or ``"deit"`` (random resized crop, flip, colour jitter, random erasing;
        SynthShapes is rendered fresh every step, so ``tiny`` uses none).
    crop_scale: lower bound of the random-resized-crop area (``deit``).
    synth: SynthShapesConfig overrides (e.g. ``{"caption_colours": false}``).
    num_prompts: K noun prompts per image for the multi-label loss.
    prompt_phrases: [R] the caption's modified nouns (:func:`mixreorg.text.noun_phrases`: "red
        circle") are drawn as prompts beside the bare nouns, each its own key: a colour, seen in one
        patch, then tells the per-patch prompt term where the shape it modifies is.
    text_keys: what makes two captions "the same text" for multi-positive targets: ``"caption"``
        (identical strings), ``"nouns"`` (identical noun sets; SynthShapes gives them, elsewhere
        :func:`mixreorg.text.extract_nouns`) or ``"none"``.
    noun_vocabulary: restrict extracted nouns to these words (None: the heuristic extractor).
    num_workers: DataLoader workers (0: in the training process).
    prefetch: batches prepared ahead on a background thread of the training process (reading the
        stream and building the batch while the step runs; 0: in the loop, between steps). Every
        batch and the exact resume are unchanged; it gains where a core is free for the thread.
    seed: data order / augmentation seed (SynthShapes: the training stream's seed).
    """

    source: str = "synthshapes"
    path: str = ""
    image_size: int = 64
    augment: str = "none"
    crop_scale: float = 0.08
    synth: dict = field(default_factory=dict)
    num_prompts: int = 3
    prompt_phrases: bool = False
    text_keys: str = "nouns"
    noun_vocabulary: list | None = None
    num_workers: int = 0
    prefetch: int = 0
    seed: int = 0


@dataclass
class ModelConfig:
    """The trainer model (:func:`mixreorg.recipes.models.build_model`).

    name: ``"groupvit"`` | ``"groupvit_plus"`` | ``"mixreorg"`` (and what the registry adds).
    vision: :class:`mixreorg.nn.GroupViTVisionEncoder` arguments (``img_size`` follows the data).
    text: :class:`mixreorg.nn.TextEncoder` arguments.
    proj_dim / proj_hidden / proj_layers: the projection heads (GroupViT: 256 / 4096 / 2).
    logit_scale_init: initial temperature multiplier (not its log; GroupViT 1/0.07, SigLIP 10).
    image_pool: ``"mean"`` (GroupViT: uniform average of the segment tokens) or ``"assigned"``
        (weighted by the share of patches each segment owns; see
        :func:`mixreorg.nn.groupvit.assigned_pool`).
    image_pool_grad: ``"assigned"`` only [R]: whether the image-level losses reach the assignment
        through the ownership weights (False stops that gradient; the vector is the same).
    mixreorg: arguments of the MixReorg encoder and its extra losses (:class:`MixReorgConfig` etc.).
    use_checkpoint: activation checkpointing of every transformer block.
    supervised_head: ``--model supervised`` only: ``"groups"`` (through the grouping) or ``"patches"``
        (per-patch classifier before the grouping); see :mod:`mixreorg.nn.supervised`.
    supervised_maps: ``--model supervised`` only: the assignment maps the per-pixel loss reads,
        ``"soft"`` (the softmax maps) or ``"hard"`` (straight-through one-hot: in the forward pass every
        pixel gets its argmax group's logits, as zero-shot inference labels it).
    supervised_aux: ``--model supervised`` only: weight of an auxiliary per-patch cross-entropy on the
        first stage's patch tokens (through the same image head and class embeddings; 0: none).
    supervised_aux_tokens: ``--model supervised`` only: the tokens that auxiliary loss reads, ``"stage1"``,
        ``"fine"`` (the finer grid the first grouping assigns; needs ``vision.group_patch_size``) or
        ``"both"`` (one loss on each, both at ``supervised_aux``; 600 steps of ``tiny_hybrid_supervised``:
        0.746 against stage1's 0.742, one seed, so not the default; docs/investigation/LOG.md, session 15).
    """

    name: str = "groupvit"
    vision: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    proj_dim: int = 256
    proj_hidden: int = 4096
    proj_layers: int = 2
    logit_scale_init: float = 1 / 0.07
    image_pool: str = "mean"
    image_pool_grad: bool = True
    mixreorg: dict = field(default_factory=dict)
    use_checkpoint: bool = False
    supervised_head: str = "groups"
    supervised_maps: str = "soft"
    supervised_aux: float = 0.0
    supervised_aux_tokens: str = "stage1"


PATCH_LABEL_TOKENS = ("stage1", "embed")  # the patches objective.patch_label_weight scores


@dataclass
class ObjectiveConfig:
    """:class:`mixreorg.losses.ContrastiveObjective` switches (same for every model)."""

    loss: str = "softmax"
    multi_positive: bool = False
    multi_label_weight: float = 1.0
    multi_label_pool: str = "image"
    patch_label_weight: float = 0.0  # [R] the prompt loss scored by each image's best patch
    prompt_uniformity_weight: float = 0.0  # [R] keep the prompts of distinct nouns apart
    patch_mean_weight: float = 0.0  # [R] caption + prompt losses on the mean patch embedding (no grouping)
    grounded_seg_weight: float = 0.0  # [R] the grouping reproduces the patches' labels among the caption's nouns
    grounded_seg_scope: str = "image"  # [R] "image" | "batch" | "noun": what each segment is told apart from
    grounded_patch_weight: float = 0.0  # [R] the same labels on the patch tokens (scope batch or noun)
    grounded_patch_on: str = "all"  # [R] "all" | "phrases": which prompts may teach a patch
    grounded_patch_threshold: float = 0.0  # [R] > 0: only confident patches, hard labels
    grounded_teacher: str = "self"  # [R] "self" | "ema" (an EMA copy) | "oracle" (the masks: a diagnostic)
    grounded_teacher_start: int = 0  # [R] "ema": the step the copy is taken (the patch term waits for it)
    grounded_teacher_momentum: float = 0.999  # [R] "ema": the average's momentum (1: frozen at the start step)
    grounded_vocab: str = "prompts"  # [R] "prompts" | "nouns": the grounded students choose among bare nouns
    grounded_labels: str = "soft"  # [R] "soft" | "cam": the teacher's softmax, or thresholded activation maps
    grounded_cam_threshold: float = 0.7  # [R] "cam": below this a patch is left unlabelled
    patch_label_tokens: str = "stage1"  # which patches: "stage1" (after its blocks) | "embed" (before any)
    bias_init: float = -10.0
    ml_bias_init: float | None = None


@dataclass
class OptimConfig:
    """AdamW with GroupViT's schedule.

    The peak learning rate is ``lr * batch_size / base_batch`` (linear scaling); it warms up linearly
    from ``warmup_lr`` over ``warmup_steps`` and then follows a cosine to ``min_lr`` (both scaled
    likewise) at ``train.steps``. No weight decay on 1-D parameters (biases, norms, scales), the
    position embeddings and the group tokens.
    """

    lr: float = 1.6e-3
    base_batch: int = 4096
    warmup_lr: float = 4e-6
    min_lr: float = 4e-5
    warmup_steps: int = 0
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 5.0


@dataclass
class TrainConfig:
    """The loop.

    batch_size: GLOBAL batch (split evenly over ranks).
    steps: optimiser steps; time_limit: stop early after this many seconds of training (0: none),
        saving a checkpoint.
    schedule_by_time: with a time limit, the lr schedule follows whichever is further along, the
        steps or the time budget, so the warmup and the cosine complete within the budget on a slower
        (or busier) machine too. Results then depend on the machine's speed; exact resume holds only
        without it. The warmup is then the first ``warmup_steps / steps`` of the budget: set ``steps``
        near what the budget fits, or the warmup shrinks with it.
    amp: bf16 autocast on CUDA (ignored on CPU: see ``cpu_bf16``).
    cpu_bf16: bf16 autocast on CPU: ``"off"`` (float32), ``"auto"`` (on where the CPU computes bf16
        natively -- AVX512-BF16 or AMX, :func:`mixreorg.recipes.train.cpu_bf16_support` -- off
        elsewhere) or ``"on"`` (required: a CPU without native bf16 raises instead of emulating it
        several times slower). Off by default (the same seeds then give the same weights on every CPU);
        the tiny presets use ``auto`` (their docstring has the learning check).
    compile: ``torch.compile`` the trainer model's forward and backward (the optimiser step stays
        eager). Token rows are then padded to the text context so that every step has one shape;
        the first steps pay the compilation.
    threads: torch CPU threads per process (0: leave torch's default).
    save_every: checkpoint interval in steps (0: only at the end); keep_last: checkpoints kept.
    log_every: JSONL / progress interval in steps.
    log: ``jsonl`` (``metrics.jsonl``, always written: the record) or ``tensorboard`` (the same
        scalars also in ``<out_dir>/tb/`` for TensorBoard; needs the ``tensorboard`` extra).
    """

    batch_size: int = 4096
    steps: int = 88_000
    time_limit: float = 0.0
    schedule_by_time: bool = False
    seed: int = 0
    amp: bool = True
    cpu_bf16: str = "off"
    compile: bool = False
    threads: int = 0
    out_dir: str = "runs/pretrain"
    save_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    log: str = "jsonl"


@dataclass
class EvalConfig:
    """Zero-shot segmentation after (and optionally during) training.

    datasets: names for :func:`mixreorg.recipes.evaluate.evaluate` (``synthshapes`` needs no files;
        ``voc``, ``context``, ``coco_object``, ``ade20k`` need ``roots``).
    every: evaluate every N steps during training (0: only at the end; negative: never).
    size: SynthShapes eval images.
    """

    datasets: list = field(default_factory=lambda: ["synthshapes"])
    roots: dict = field(default_factory=dict)
    every: int = 0
    size: int = 512
    batch_size: int = 64
    overlays: int = 8


@dataclass
class PretrainConfig:
    """The whole run. ``preset`` names the preset it was built from (informational)."""

    preset: str = "tiny"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ------------------------------------------------------------------ derived values
    def world_batch(self) -> int:
        return self.train.batch_size

    def peak_lr(self) -> float:
        """The learning rate after warmup (linear scaling with the global batch)."""
        return self.optim.lr * self.train.batch_size / self.optim.base_batch

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(self.to_json() + "\n")
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | Path) -> PretrainConfig:
        return config_from_dict(json.loads(Path(path).read_text()))

    def validate(self) -> PretrainConfig:
        """Raise ``ValueError`` naming every problem found (returns self)."""
        problems = []
        if self.data.source not in ("synthshapes", "folder", "csv", "webdataset"):
            problems.append(f"data.source must be synthshapes|folder|csv|webdataset, got {self.data.source!r}")
        if self.data.source != "synthshapes" and not self.data.path:
            problems.append(f"data.path is required for data.source={self.data.source!r}")
        if self.data.augment not in ("none", "deit"):
            problems.append(f"data.augment must be none|deit, got {self.data.augment!r}")
        if self.data.text_keys not in ("caption", "nouns", "none"):
            problems.append(f"data.text_keys must be caption|nouns|none, got {self.data.text_keys!r}")
        if self.data.num_prompts < 1:
            problems.append(f"data.num_prompts must be >= 1, got {self.data.num_prompts}")
        if self.model.image_pool not in ("mean", "assigned"):
            problems.append(f"model.image_pool must be mean|assigned, got {self.model.image_pool!r}")
        elif not self.model.image_pool_grad and self.model.image_pool != "assigned":
            problems.append("model.image_pool_grad=false needs model.image_pool=assigned (mean pooling has no weights)")
        if self.model.supervised_head not in ("groups", "patches"):
            problems.append(f"model.supervised_head must be groups|patches, got {self.model.supervised_head!r}")
        if self.model.supervised_maps not in ("soft", "hard"):
            problems.append(f"model.supervised_maps must be soft|hard, got {self.model.supervised_maps!r}")
        if not self.model.supervised_aux >= 0:
            problems.append(f"model.supervised_aux must be >= 0, got {self.model.supervised_aux!r}")
        if self.model.supervised_aux_tokens not in ("stage1", "fine", "both"):
            problems.append(
                f"model.supervised_aux_tokens must be stage1|fine|both, got {self.model.supervised_aux_tokens!r}"
            )
        if self.objective.multi_label_pool not in ("image", "max_segment"):
            problems.append(
                f"objective.multi_label_pool must be image|max_segment, got {self.objective.multi_label_pool!r}"
            )
        if not self.objective.patch_label_weight >= 0:
            problems.append(f"objective.patch_label_weight must be >= 0, got {self.objective.patch_label_weight!r}")
        if not self.objective.prompt_uniformity_weight >= 0:
            problems.append(
                f"objective.prompt_uniformity_weight must be >= 0, got {self.objective.prompt_uniformity_weight!r}"
            )
        if self.objective.grounded_seg_scope not in ("image", "batch", "noun"):
            problems.append(
                f"objective.grounded_seg_scope must be image|batch|noun, got {self.objective.grounded_seg_scope!r}"
            )
        if not self.objective.grounded_seg_weight >= 0:
            problems.append(f"objective.grounded_seg_weight must be >= 0, got {self.objective.grounded_seg_weight!r}")
        if not self.objective.grounded_patch_weight >= 0:
            problems.append(
                f"objective.grounded_patch_weight must be >= 0, got {self.objective.grounded_patch_weight!r}"
            )
        elif self.objective.grounded_patch_weight > 0 and self.objective.grounded_seg_scope == "image":
            problems.append("objective.grounded_patch_weight > 0 needs objective.grounded_seg_scope batch|noun "
                            "(in the image scope a patch is its own teacher: zero gradient)")
        if self.objective.grounded_patch_on == "phrases" and not self.data.prompt_phrases:
            problems.append("objective.grounded_patch_on=phrases needs data.prompt_phrases=true (without phrase "
                            "prompts no patch would be taught)")
        if self.objective.grounded_patch_on not in ("all", "phrases"):
            problems.append(
                f"objective.grounded_patch_on must be all|phrases, got {self.objective.grounded_patch_on!r}"
            )
        if self.objective.grounded_teacher not in ("self", "ema", "oracle"):
            problems.append(
                f"objective.grounded_teacher must be self|ema|oracle, got {self.objective.grounded_teacher!r}")
        elif self.objective.grounded_teacher == "oracle" and self.data.source != "synthshapes":
            problems.append("objective.grounded_teacher=oracle reads SynthShapes' masks: needs data.source=synthshapes")
        elif self.objective.grounded_teacher != "self" and self.model.name not in ("groupvit", "groupvit_plus"):
            problems.append(f"objective.grounded_teacher={self.objective.grounded_teacher} is built for --model "
                            "groupvit|groupvit_plus only, got "
                            f"{self.model.name!r}")
        start, momentum = self.objective.grounded_teacher_start, self.objective.grounded_teacher_momentum
        if not isinstance(start, int) or start < 0:
            problems.append(f"objective.grounded_teacher_start must be an integer >= 0, got {start!r}")
        if not 0.0 <= momentum <= 1.0:
            problems.append(f"objective.grounded_teacher_momentum must be in [0, 1], got {momentum!r}")
        if self.objective.grounded_vocab not in ("prompts", "nouns"):
            problems.append(f"objective.grounded_vocab must be prompts|nouns, got {self.objective.grounded_vocab!r}")
        elif self.objective.grounded_vocab == "nouns" and self.objective.grounded_seg_scope != "noun":
            problems.append("objective.grounded_vocab=nouns needs objective.grounded_seg_scope=noun")
        if self.objective.grounded_labels not in ("soft", "cam"):
            problems.append(f"objective.grounded_labels must be soft|cam, got {self.objective.grounded_labels!r}")
        if not 0.0 <= self.objective.grounded_cam_threshold < 1.0:
            problems.append("objective.grounded_cam_threshold must be in [0, 1), got "
                            f"{self.objective.grounded_cam_threshold!r}")
        if not 0.0 <= self.objective.grounded_patch_threshold < 1.0:
            problems.append(
                f"objective.grounded_patch_threshold must be in [0, 1), got {self.objective.grounded_patch_threshold!r}"
            )
        if not self.objective.patch_mean_weight >= 0:
            problems.append(f"objective.patch_mean_weight must be >= 0, got {self.objective.patch_mean_weight!r}")
        if self.objective.patch_label_tokens not in PATCH_LABEL_TOKENS:
            problems.append(
                f"objective.patch_label_tokens must be stage1|embed, got {self.objective.patch_label_tokens!r}"
            )
        if self.objective.loss not in ("softmax", "sigmoid"):
            problems.append(f"objective.loss must be softmax|sigmoid, got {self.objective.loss!r}")
        if self.train.batch_size < 1 or self.train.steps < 1:
            problems.append(
                f"train.batch_size and train.steps must be >= 1, got {self.train.batch_size}, {self.train.steps}"
            )
        if self.optim.lr <= 0 or self.optim.base_batch < 1:
            problems.append(
                f"optim.lr must be > 0 and optim.base_batch >= 1, got {self.optim.lr}, {self.optim.base_batch}"
            )
        if not 0 <= self.optim.warmup_steps <= self.train.steps:
            problems.append(
                f"optim.warmup_steps must be in [0, train.steps={self.train.steps}], got {self.optim.warmup_steps}"
            )
        if self.model.logit_scale_init <= 0:
            problems.append(f"model.logit_scale_init is a multiplier (> 0), got {self.model.logit_scale_init}")
        if self.train.log not in ("jsonl", "tensorboard"):
            problems.append(f"train.log must be jsonl|tensorboard, got {self.train.log!r}")
        if self.train.keep_last < 1:
            problems.append(f"train.keep_last must be >= 1, got {self.train.keep_last}")
        problems += _dict_key_problems(self)
        if problems:
            raise ValueError("invalid pretraining config:\n  " + "\n  ".join(problems))
        return self


def _dict_field_keys() -> dict[str, list[str]]:
    """The keys each dict-typed config field accepts (``"model.vision"`` -> sorted names).

    ``model.vision`` / ``model.text``: the parameters of :class:`mixreorg.nn.vision.GroupViTVisionEncoder`
    / :class:`mixreorg.nn.text.TextEncoder` (``img_size`` and ``use_checkpoint`` are set by the builder
    from ``data.image_size`` / ``model.use_checkpoint``, and accepted); ``model.mixreorg``: the fields of
    :class:`mixreorg.nn.mixreorg.MixReorgConfig` plus ``seg_weight`` / ``restored_weight`` /
    ``patch_seg_weight`` / ``mixed_grounded_weight``;
    ``data.synth``: the fields of :class:`mixreorg.data.synthshapes.SynthShapesConfig` except
    ``image_size`` (``data.image_size`` sets it); ``eval.roots``: the datasets that need a root folder.
    """
    import inspect

    from mixreorg.data.segmentation import _DATASETS
    from mixreorg.data.synthshapes import SynthShapesConfig
    from mixreorg.nn.mixreorg import MixReorgConfig
    from mixreorg.nn.text import TextEncoder
    from mixreorg.nn.vision import GroupViTVisionEncoder

    def params(fn: Any) -> list[str]:
        return [
            n
            for n, p in inspect.signature(fn).parameters.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

    return {
        "data.synth": sorted(f.name for f in dataclasses.fields(SynthShapesConfig) if f.name != "image_size"),
        "model.vision": sorted(params(GroupViTVisionEncoder.__init__)),
        "model.text": sorted(params(TextEncoder.__init__)),
        "model.mixreorg": sorted(
            [f.name for f in dataclasses.fields(MixReorgConfig)]
            + ["seg_weight", "restored_weight", "patch_seg_weight", "mixed_grounded_weight"]
        ),
        "eval.roots": sorted(_DATASETS),
    }


def _dict_key_problems(cfg: PretrainConfig) -> list[str]:
    """One line per dict field holding keys nothing reads (a typo would otherwise be ignored)."""
    problems = []
    for where, valid in _dict_field_keys().items():
        section, name = where.split(".")
        value = getattr(getattr(cfg, section), name)
        if not isinstance(value, Mapping):
            problems.append(f"{where} must be a dict, got {type(value).__name__}")
            continue
        norm = (lambda k: str(k).lower().replace("-", "_")) if where == "eval.roots" else str
        unknown = sorted(str(k) for k in value if norm(k) not in valid)
        if unknown:
            problems.append(f"unknown key(s) in {where}: {unknown}; valid: {valid}")
    return problems


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------- presets
def _tiny() -> PretrainConfig:
    """The CPU demo preset: SynthShapes, about 6 minutes of training on 2 cores.

    Chosen by measurement (the investigation log quoted in the README), one change at a time:

    * ``image_pool="assigned"``: the image vector averages the segment tokens weighted by the patches
      they own. With GroupViT's uniform average, segments that own no patch carried the image's
      semantics (their tokens still see the whole image through the grouping block's
      cross-attention) while the pixel-owning segment matched, e.g., "sky" on a grass image: the
      maps then labelled whole images wrongly (mIoU 0.02-0.22 across runs). Owner-weighted: 0.32,
      all four backgrounds at 74-78 IoU, same steps and seed.

    * ONE grouping stage (3 + 3 blocks, 8 groups): with GroupViT's two stages (16 -> 8) the second
      grouping merged every object into the background group (1.5 groups used per image) and the
      maps lost the objects; one stage keeps objects in their own groups.
    * softmax InfoNCE (the sigmoid form with bias -10, or -4/-2, sat at its collapsed optimum);
      multi-positive targets for captions with the same nouns; GroupViT's multi-label prompt loss
      (it stabilised the grouping runs, which without it could label whole images with one class).
    * hard Gumbel assignment (soft assignment: mIoU 0.08 vs 0.2); lr 2e-3 at batch 64 (faster early
      learning than 1e-3 within the budget); linear projection heads; text tower 2 x 128 wide.
    * ``train.time_limit`` with ``schedule_by_time``: the warmup and cosine complete within the
      budget even on a slower or busier machine.
    * ``train.cpu_bf16="auto"``: bf16 autocast where the CPU computes bf16 natively, float32
      elsewhere. On an AMX Xeon the steps are 1.29-1.48x faster; the learning check
      (``python -m mixreorg.recipes.bf16_check --seeds 0 1 2 3 4``, 450 steps): float32 mIoU
      31.4 ± 0.3, bf16 31.2 ± 0.9, within float32's seed spread (with the first 3 seeds alone 0.04
      points below it); the supervised bound in its 300 s: 0.834 in bf16 (1930 steps), 0.822 in
      float32 (1520 steps). benchmarks/RESULTS.md has the numbers.
    """
    return PretrainConfig(
        preset="tiny",
        data=DataConfig(source="synthshapes", image_size=64, augment="none", num_prompts=3, text_keys="nouns"),
        model=ModelConfig(
            name="groupvit",
            vision=dict(
                patch_size=8,
                embed_dim=128,
                num_heads=4,
                depths=[3, 3],
                num_group_tokens=[8, 0],
                num_output_groups=[8],
                drop_path_rate=0.0,
                hard_assignment=True,
                gumbel=True,
            ),
            text=dict(context_length=32, width=128, layers=2, heads=4),
            proj_dim=128,
            proj_hidden=512,
            proj_layers=1,
            logit_scale_init=1 / 0.07,
            image_pool="assigned",
        ),
        objective=ObjectiveConfig(
            loss="softmax", multi_positive=True, multi_label_weight=1.0, multi_label_pool="image"
        ),
        optim=OptimConfig(
            lr=2e-3, base_batch=64, warmup_lr=1e-5, min_lr=2e-5, warmup_steps=50, weight_decay=0.05, clip_grad=5.0
        ),
        train=TrainConfig(
            batch_size=64,
            steps=600,
            time_limit=390.0,
            schedule_by_time=True,
            amp=True,
            cpu_bf16="auto",
            threads=0,
            out_dir="runs/tiny",
            save_every=100,
            keep_last=2,
            log_every=10,
        ),
        eval=EvalConfig(datasets=["synthshapes"], every=0, size=512, batch_size=128, overlays=8),
    )


def _as_mixreorg(cfg: PretrainConfig) -> PretrainConfig:
    """A tiny preset's MixReorg twin: ``model.name="mixreorg"`` with G = 8, everything else the same."""
    cfg.preset = f"{cfg.preset}_mixreorg"
    cfg.model.name = "mixreorg"
    cfg.model.mixreorg = dict(group_size=8)
    cfg.train.out_dir = f"runs/{cfg.preset}"
    return cfg


def _tiny_mixreorg() -> PretrainConfig:
    return _as_mixreorg(_tiny())


def _tiny_hybrid() -> PretrainConfig:
    """The tiny preset on the hybrid backbone that learns the shapes (issue 9; docs/investigation/LOG.md,
    sessions 3-8), everything else unchanged:

    * ``stem="hybrid"``: a residual convolutional trunk (32/64/128 channels, one convolution at the
      32x32 level, ``stem_depths=[1,2,2]``: its residual block there cost time and no quality) under
      the same GroupViT stages, as the ViT paper's R50+ViT; its residual blocks start at full strength
      (``stem_zero_init=False``: from image-level labels the trunk alone reaches shape AUC 0.83 instead
      of 0.73 in 1000 steps, and the supervised bound 0.61 instead of 0.55 mIoU in 400).
    * ``group_patch_size=4``: the first grouping assigns a 16x16 grid (the trunk's stride-4 features
      plus the upsampled token), so the maps resolve outlines twice as finely as the 8x8 tokens (a
      perfect 8x8 segmenter caps at 0.805 mIoU on the eval split, 16x16 at 0.933).
    * for ``--model supervised`` (the upper bound): straight-through hard maps in the per-pixel loss
      and deep supervision of the grouped patch tokens at weight 4 (``supervised_aux``; 1000 steps:
      mIoU 0.748 / 0.789 / 0.799 / 0.802 at weights 1 / 2 / 3 / 4, things 0.62 / 0.69 / 0.70 / 0.71).
    """
    cfg = _tiny()
    cfg.preset = "tiny_hybrid"
    cfg.model.vision.update(stem="hybrid", stem_depths=[1, 2, 2], stem_zero_init=False, group_patch_size=4)
    cfg.model.supervised_maps = "hard"
    cfg.model.supervised_aux = 4.0
    cfg.train.out_dir = "runs/tiny_hybrid"
    return cfg


def _tiny_hybrid_supervised() -> PretrainConfig:
    """The supervised upper bound on ``tiny_hybrid`` in 5 minutes of training: ``--model supervised``,
    batch 32 at the same peak lr (``base_batch=32``; in the same 300 s batch 32 reached mIoU 0.748,
    batch 16 0.565), ``time_limit=300`` with ``schedule_by_time``.

    ``steps=2000`` with 400 warmup steps: under the time limit the schedule runs on the fraction of
    the budget, so the warmup is its first ``400 / 2000 = 20%`` on a machine that fits fewer steps
    (2-core AMD EPYC: 640-900) and 400 real steps on one that fits 2000. At 600 fixed steps a warmup
    of 8% / 17% / 33% of them gave mIoU 0.705 / 0.742 / 0.749; the preset's earlier ``steps=5000``
    with 100 warmup steps had squeezed the warmup into the first 2% of the budget (about 16 steps)
    (docs/investigation/LOG.md, session 15)."""
    cfg = _tiny_hybrid()
    cfg.preset = "tiny_hybrid_supervised"
    cfg.model.name = "supervised"
    cfg.train.batch_size = 32
    cfg.optim.base_batch = 32
    cfg.optim.warmup_steps = 400
    cfg.train.steps = 2000
    cfg.train.time_limit = 300.0
    cfg.train.out_dir = "runs/tiny_hybrid_supervised"
    return cfg


def _tiny_hybrid_mixreorg() -> PretrainConfig:
    return _as_mixreorg(_tiny_hybrid())


def _tiny_grounded() -> PretrainConfig:
    """``tiny_hybrid`` taught where the caption's nouns are (issue 9; docs/investigation/LOG.md,
    session 11). Objective changes only, the backbone is ``tiny_hybrid``'s:

    * ``data.prompt_phrases`` with ``num_prompts=6``: "red circle" beside "circle" (a colour is found
      in one patch, the shape it modifies then has a place);
    * ``objective.patch_label_weight=1``: every prompt scored by the image's best patch;
    * ``objective.prompt_uniformity_weight=1``: distinct nouns' prompts kept apart;
    * ``objective.grounded_seg_weight=1`` with ``grounded_seg_scope="noun"``: the grouping path must
      give each grouped position the noun its patch shows among the caption's.

    500 steps, GroupViT: mIoU 0.388 / 0.226 / 0.146 with seeds 0 / 1 / 2 (0.253 ± 0.123; seed 0 uses
    4.9 groups per image, seeds 1-2 about two), against 0.289 / 0.336 without the grounded term:
    whether the grouping splits the objects depends on the seed (docs/investigation/LOG.md, session 12).
    (Those runs had ``tiny``'s 50 warmup steps; with ``--steps N`` the preset's 120 are now kept.)

    The schedule is the main job's (``scripts/main.sh`` runs the MixReorg twin): 720 steps with 120
    of warmup (17%: session 15's warmup table), or 480 s of training on a machine too slow for them
    (``schedule_by_time``). The steps are what turns the objects' names on: 1500 steps of GroupViT
    give things 0.220 (every shape 0.14-0.36) where 500 gave 0.081 (session 16).

    Six group tokens instead of ``tiny``'s eight: the MixReorg twin at 720 steps, seeds 0 / 1, mIoU
    0.266 / 0.364 (stuff 0.53 / 0.78, things 0.093 / 0.088) against 0.231 / 0.207 with eight (stuff
    0.47 / 0.40, things 0.075 / 0.077): with eight, more of the backgrounds' segments took an object's
    name (about 3 groups used per image either way). In two of four six-token runs L_seg stayed near
    chance (mIoU 0.364 both, stuff 0.78-0.79); the two that learned it scored 0.27 (stuff 0.53-0.55)
    (session 16).
    """
    cfg = _tiny_hybrid()
    cfg.preset = "tiny_grounded"
    cfg.data.prompt_phrases = True
    cfg.data.num_prompts = 6
    cfg.objective.patch_label_weight = 1.0
    cfg.objective.prompt_uniformity_weight = 1.0
    cfg.objective.grounded_seg_weight = 1.0
    cfg.objective.grounded_seg_scope = "noun"
    cfg.model.vision.update(num_group_tokens=[6, 0], num_output_groups=[6])
    cfg.train.steps = 720
    cfg.optim.warmup_steps = 120
    cfg.train.time_limit = 480.0
    cfg.train.out_dir = "runs/tiny_grounded"
    return cfg


def _tiny_grounded_mixreorg() -> PretrainConfig:
    """``tiny_grounded``'s MixReorg twin, its mixed images named by their sources' nouns as well
    (``model.mixreorg.mixed_grounded_weight=1``): 320 steps, G = 8, seeds 0 / 1, mIoU 0.240 / 0.163
    with it and 0.151 / 0.139 without (L_seg, which keeps each source image in one segment, works
    against the grounded grouping; without L_seg 0.340-0.349 with seed 0; docs/investigation/LOG.md,
    sessions 11-12). At 900 steps (session 16, seed 0) L_seg helps instead: ``seg_weight`` 1 / 0.25 / 0
    give mIoU 0.236 / 0.174 / 0.131, things 0.114 / 0.089 / 0.058.

    The main job (``scripts/main.sh``): its 720 steps take about 7 minutes on 2 cores of an AMD
    EPYC with AVX512-BF16 (0.56-0.62 s per step; 800 steps did not fit the 480 s there: 776)."""
    cfg = _as_mixreorg(_tiny_grounded())
    cfg.model.mixreorg["mixed_grounded_weight"] = 1.0
    return cfg


def _paper(name: str) -> PretrainConfig:
    """GroupViT-S as published (NVlabs config ``group_vit_gcc_yfcc_30e``), on CC12M webdataset shards."""
    steps_per_epoch = math.ceil(12_000_000 / 4096)
    return PretrainConfig(
        preset=f"{name}_cc12m",
        data=DataConfig(
            source="webdataset",
            path="data/cc12m/{00000..01242}.tar",
            image_size=224,
            augment="deit",
            crop_scale=0.08,
            num_prompts=3,
            text_keys="none",
            num_workers=6,
        ),
        model=ModelConfig(
            name=name,
            vision=dict(
                patch_size=16,
                embed_dim=384,
                num_heads=6,
                depths=[6, 3, 3],
                num_group_tokens=[64, 8, 0],
                num_output_groups=[64, 8],
                drop_path_rate=0.1,
                hard_assignment=True,
                gumbel=True,
            ),
            text=dict(context_length=77, width=256, layers=12, heads=4),
            proj_dim=256,
            proj_hidden=4096,
            proj_layers=2,
            logit_scale_init=1 / 0.07,
            mixreorg=dict(group_size=16) if name == "mixreorg" else {},
        ),
        objective=ObjectiveConfig(loss="softmax", multi_positive=False, multi_label_weight=1.0),
        optim=OptimConfig(
            lr=1.6e-3,
            base_batch=4096,
            warmup_lr=4e-6,
            min_lr=4e-5,
            warmup_steps=2 * steps_per_epoch,
            weight_decay=0.05,
            clip_grad=5.0,
        ),
        train=TrainConfig(
            batch_size=4096,
            steps=30 * steps_per_epoch,
            amp=True,
            out_dir=f"runs/{name}_cc12m",
            save_every=1000,
            keep_last=3,
            log_every=10,
        ),
        eval=EvalConfig(datasets=["synthshapes"], every=5000),
    )


PRESETS: dict[str, Any] = {
    "tiny": _tiny,
    "tiny_mixreorg": _tiny_mixreorg,
    "tiny_hybrid": _tiny_hybrid,
    "tiny_hybrid_mixreorg": _tiny_hybrid_mixreorg,
    "tiny_hybrid_supervised": _tiny_hybrid_supervised,
    "tiny_grounded": _tiny_grounded,
    "tiny_grounded_mixreorg": _tiny_grounded_mixreorg,
    "groupvit_cc12m": lambda: _paper("groupvit"),
    "mixreorg_cc12m": lambda: _paper("mixreorg"),
}


def get_preset(name: str) -> PretrainConfig:
    """A fresh copy of preset ``name`` (``ValueError`` listing the presets for an unknown name)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


# ---------------------------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value)``; the value is JSON when it parses as JSON, else a string."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key=value (e.g. optim.lr=5e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {text!r} has an empty key")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def _coerce(value: Any, current: Any, key: str) -> Any:
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{key}: expected a bool, got {value!r}")
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{key}: expected an int, got {value!r}")
    if isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if isinstance(current, str):
        if not isinstance(value, str):
            return json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        return value
    if isinstance(current, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return type(current)(value)
    return value


def apply_overrides(cfg: PretrainConfig, overrides: Sequence[str] | Mapping[str, Any]) -> PretrainConfig:
    """Apply ``key=value`` overrides (dotted keys; dict-valued fields take sub-keys: ``model.vision.depths``).

    Unknown keys raise ``ValueError`` listing the valid ones at that level.
    """
    items = list(overrides.items()) if isinstance(overrides, Mapping) else [parse_override(o) for o in overrides]
    for key, value in items:
        parts = key.split(".")
        obj: Any = cfg
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if dataclasses.is_dataclass(obj):
                names = [f.name for f in dataclasses.fields(obj)]
                if part not in names:
                    where = ".".join(parts[:i]) or "config"
                    raise ValueError(f"unknown config key {key!r}: {where} has {', '.join(names)}")
                if last:
                    setattr(obj, part, _coerce(value, getattr(obj, part), key))
                else:
                    obj = getattr(obj, part)
            elif isinstance(obj, dict):
                if last:
                    obj[part] = _coerce(value, obj.get(part), key)
                else:
                    obj = obj.setdefault(part, {})
            else:
                raise ValueError(f"config key {key!r}: {'.'.join(parts[:i])} is not a section")
    return cfg


def config_from_dict(d: Mapping[str, Any]) -> PretrainConfig:
    """Inverse of :meth:`PretrainConfig.to_dict` (unknown keys raise ``ValueError``)."""
    base = PretrainConfig()
    sections = {f.name: f for f in dataclasses.fields(PretrainConfig)}
    kwargs: dict[str, Any] = {}
    for name, value in d.items():
        if name not in sections:
            raise ValueError(f"unknown config section {name!r}; sections: {', '.join(sections)}")
        current = getattr(base, name)
        if dataclasses.is_dataclass(current):
            fields = {f.name for f in dataclasses.fields(current)}
            unknown = set(value) - fields
            if unknown:
                raise ValueError(f"unknown keys in config section {name!r}: {sorted(unknown)}")
            sub = copy.deepcopy(value)
            if "betas" in sub:
                sub["betas"] = tuple(sub["betas"])
            kwargs[name] = type(current)(**sub)
        else:
            kwargs[name] = value
    return PretrainConfig(**kwargs)
