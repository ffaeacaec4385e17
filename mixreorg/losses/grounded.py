"""Caption-grounded segmentation: dense pseudo-labels from the caption's own nouns [R].

Zero-shot over a whole vocabulary is hard early in training; telling which of ITS OWN caption's
nouns a patch shows is easy much sooner, because a caption names few things and its modifiers are
local ("a red circle and an orange ring on sand": red patches are the circle). The patch tokens,
trained by the per-patch prompt term, give each patch a soft label over its image's noun prompts
(the teacher, no gradient); the grouping path is trained to reproduce it patch by patch, each patch
reading its segment's embedding through the straight-through hard map, as zero-shot inference
labels it (the student). This is the supervised bound's per-pixel loss with the caption's nouns
in place of the masks: it asks the grouping to give differently named parts different segments,
which no image-level term does (the one-segment collapse of the tiny recipe). Not in the paper.

Three students of the same teacher: the grouped positions (:func:`grounded_seg_loss`), the patch
tokens themselves (:func:`grounded_patch_loss`) and MixReorg's mixed images, each patch named by
the label of the original patch it came from (:func:`grounded_mixed_loss`). What each measured on
the tiny recipe, over seeds where it was checked: docs/investigation/LOG.md, sessions 11-12.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "grounded_seg_loss",
    "grounded_patch_loss",
    "grounded_mixed_loss",
    "teacher_labels",
    "GROUNDED_SCOPES",
    "GROUNDED_PATCH_ON",
    "GROUNDED_LABELS",
]

GROUNDED_SCOPES = ("image", "batch", "noun")  # what a position's segment is told apart from
GROUNDED_PATCH_ON = ("all", "phrases")  # which prompts may teach a patch (objective.grounded_patch_on)
GROUNDED_LABELS = ("soft", "cam")  # how a teacher's similarities become labels (see teacher_labels)

_MASKED = -1e4  # not -inf: a masked logit times a zero target must stay finite


def _check(patch_embed, seg_embed, assign, prompt_embed, prompt_mask) -> None:
    if patch_embed.ndim != 3 or seg_embed.ndim != 3 or prompt_embed.ndim != 3 or assign.ndim != 3:
        raise ValueError(
            "grounded_seg_loss needs patch_embed [B, L, D], seg_embed [B, S, D], assign [B, S, N] and "
            f"prompt_embed [B, K, D], got {tuple(patch_embed.shape)}, {tuple(seg_embed.shape)}, "
            f"{tuple(assign.shape)}, {tuple(prompt_embed.shape)}"
        )
    b, s, d = seg_embed.shape
    k = prompt_embed.shape[1]
    if (patch_embed.shape[0], patch_embed.shape[2], prompt_embed.shape[0], prompt_embed.shape[2]) != (b, d, b, d):
        raise ValueError(
            f"batch and embedding sizes differ: patch_embed {tuple(patch_embed.shape)}, seg_embed "
            f"{tuple(seg_embed.shape)}, prompt_embed {tuple(prompt_embed.shape)}"
        )
    if assign.shape[:2] != (b, s):
        raise ValueError(f"assign must be [B={b}, S={s}, N], got {tuple(assign.shape)}")
    if prompt_mask.shape != (b, k) or prompt_mask.dtype != torch.bool:
        raise ValueError(
            f"prompt_mask must be a bool [B={b}, K={k}], got {prompt_mask.dtype} {tuple(prompt_mask.shape)}"
        )


def _square(n: int, what: str) -> int:
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"{what}: {n} tokens are not a square grid")
    return side


def _grids(patch_embed: torch.Tensor, assign: torch.Tensor) -> tuple[int, int]:
    """``(h, H)``: the patch grid side and the grouped grid side, ``H`` a multiple of ``h``."""
    h, big = _square(patch_embed.shape[1], "patch_embed"), _square(assign.shape[2], "assign")
    if big % h:
        raise ValueError(f"the grouped grid ({big}x{big}) is not a multiple of the patch grid ({h}x{h})")
    return h, big


def _to_grouped_grid(x: torch.Tensor, h: int, big: int) -> torch.Tensor:
    """``[B, h*h, C]`` per-patch values to the ``[B, H*H, C]`` grouped positions each patch covers."""
    if big == h:
        return x
    grid = x.transpose(1, 2).reshape(x.shape[0], -1, h, h)
    return F.interpolate(grid, size=(big, big), mode="nearest").flatten(2).transpose(1, 2)


def _share_by_id(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """``[B*K, B*K]``: row ``a`` spreads prompt ``a``'s mass equally over the noun prompts with its id."""
    ids, mask = prompt_ids.reshape(-1), prompt_mask.reshape(-1)
    same = (ids[:, None] == ids[None, :]) & mask[None, :]
    return same.float() / same.sum(-1, keepdim=True).clamp_min(1)


def _vocab_logp(pos, prompt_embed, prompt_mask, scale) -> torch.Tensor:
    """``[B, N, B*K]`` each student's log-softmax over every noun prompt of the batch."""
    b, k = prompt_mask.shape
    logits = torch.einsum("bnd,md->bnm", pos.float(), prompt_embed.reshape(b * k, -1).float()) * scale
    return logits.masked_fill(~prompt_mask.reshape(1, 1, b * k).to(pos.device), _MASKED).log_softmax(-1)


def grounded_seg_loss(
    patch_embed: torch.Tensor,
    seg_embed: torch.Tensor,
    assign: torch.Tensor,
    prompt_embed: torch.Tensor,
    prompt_mask: torch.Tensor,
    scale: torch.Tensor | float,
    *,
    scope: str = "image",
    prompt_ids: torch.Tensor | None = None,
    teacher: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None,
    vocab_mask: torch.Tensor | None = None,
    labels: str = "soft",
    cam_threshold: float = 0.7,
) -> torch.Tensor:
    """Soft cross-entropy, per grouped position, from the teacher's labels to the segments'.

    Args:
        patch_embed: ``[B, L, D]`` normalised patch embeddings on a square ``h x h`` grid (the
            teacher; read without gradient).
        seg_embed: ``[B, S, D]`` normalised segment embeddings.
        assign: ``[B, S, N]`` the composed hard (straight-through) map from the segments to the
            ``N = H x H`` grouped positions, ``H`` a multiple of ``h``.
        prompt_embed: ``[B, K, D]`` normalised prompt embeddings, image ``i``'s own in row ``i``.
        prompt_mask: ``[B, K]`` bool, the prompts built from a noun or phrase of the caption (caption
            fillers are left out: they name everything at once).
        scale: the logit scale (multiplier).
        scope: ``"image"``: a segment is told apart from its own image's other noun prompts only;
            ``"batch"``: from every noun prompt of the batch, the teacher's mass on a prompt shared
            equally by the prompts with its key (``prompt_ids [B, K]``), as zero-shot inference
            tells a segment apart from the whole vocabulary; ``"noun"``: as ``"batch"`` with
            ``prompt_ids`` the prompts' head nouns, so that the mass the teacher puts on "red
            circle" (found by its colour) goes to every prompt naming a circle: the colour
            localises, the noun labels.
        teacher: ``(patch_embed [B, L, D], prompt_embed [B, K, D])`` of another model (e.g. an EMA
            copy, :class:`mixreorg.nn.ModelEma`) that labels the patches instead of ``patch_embed``
            and ``prompt_embed``, which then only score the students; or the labels themselves,
            ``[B, L, K]`` over each image's prompts (e.g. from masks: a diagnostic).
        vocab_mask: ``[B, K]`` bool (``batch`` / ``noun`` scope): the prompts the students are told
            apart from, and the only ones that receive the teacher's mass (default: every noun
            prompt). The bare nouns' prompts ("circle", not "red circle") make the student's choice
            the one zero-shot inference makes, over nouns; with every prompt, a red circle's patch is
            also asked to match "blue circle" while the prompt losses ask it not to.
        labels, cam_threshold: how the teacher's similarities become labels (:func:`teacher_labels`):
            ``"soft"`` (the softmax over the image's prompts) or ``"cam"`` (hard, thresholded
            activation maps; the unlabelled positions are left out of the mean).

    Images with fewer than two noun prompts tell nothing apart and count zero; the mean is over
    the images that do (0 with a zero gradient when none does). Under ``torch.distributed`` the
    batch and noun scopes contrast the rank's own prompts only (nothing is gathered).
    """
    _check(patch_embed, seg_embed, assign, prompt_embed, prompt_mask)
    _check_scope(scope, prompt_ids, prompt_mask)
    vocab = _vocab(vocab_mask, prompt_mask, scope)
    h, big = _grids(patch_embed, assign)
    target = _teacher(patch_embed, prompt_embed, prompt_mask, scale, teacher, labels, cam_threshold)  # [B, L, K]
    target = _to_grouped_grid(target, h, big)  # [B, N, K]
    pos = torch.einsum("bsn,bsd->bnd", assign.to(seg_embed.dtype), seg_embed)  # [B, N, D]: each position's segment
    per_pos = _student_loss(pos, target, prompt_embed, prompt_mask, scale, scope, prompt_ids, vocab)  # [B, N]
    return _image_mean(per_pos, prompt_mask, _labelled(target, labels, teacher))


def grounded_patch_loss(
    patch_embed: torch.Tensor,
    prompt_embed: torch.Tensor,
    prompt_mask: torch.Tensor,
    scale: torch.Tensor | float,
    *,
    scope: str = "noun",
    prompt_ids: torch.Tensor | None = None,
    teach_on: torch.Tensor | None = None,
    threshold: float = 0.0,
    teacher: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None,
    vocab_mask: torch.Tensor | None = None,
    labels: str = "soft",
    cam_threshold: float = 0.7,
) -> torch.Tensor:
    """The grounded label on the patch tokens themselves: deep supervision of what the grouping assigns.

    Each patch is its own student: its softmax over every noun prompt of the batch must follow its
    own (gradient-free) label over its image's prompts, spread by ``prompt_ids`` as in
    :func:`grounded_seg_loss`. With ``scope="noun"`` this asks a patch that its image's caption lets
    call "red circle" (by colour) to score every circle prompt of the batch above every other noun:
    the shape, at the patch, which the supervised bound's auxiliary loss teaches with masks
    (its strongest lever, docs/investigation/LOG.md session 8). ``scope="image"`` is refused: there
    the student is its own teacher and the gradient is zero.

    Measured on the tiny recipe (LOG, session 12): worse at weights 1 and 4 (things 0.08 -> 0.02 /
    0.01). A patch that is its own teacher confirms what it leans to, and the background's noun,
    named in most captions, takes over (the teacher then names 96-100% of background patches right
    and 15-31% of object patches). A teacher that is not the student (e.g. an EMA copy) is the
    known remedy.

    ``teach_on [B, K]`` (bool, optional) and ``threshold`` (``[0, 1)``) turn the soft labels into
    confident hard ones, the usual remedy for self-training's confirmation bias (FixMatch): a patch
    is taught only where its teacher's most likely prompt is one of ``teach_on`` (e.g. the
    caption's modified nouns, "red circle": objects, found by colour) with probability above
    ``threshold``; it is then taught that prompt (spread by ``prompt_ids``) alone, and the mean is
    over the patches taught.

    Args: as :func:`grounded_seg_loss` (``patch_embed [B, L, D]`` now carries the gradient). With
    ``teacher`` the labels come from another model's patches and prompts, and a patch is no longer
    its own teacher (``scope="image"`` is then allowed).
    """
    if patch_embed.ndim != 3 or prompt_embed.ndim != 3:
        raise ValueError(
            f"grounded_patch_loss needs patch_embed [B, L, D] and prompt_embed [B, K, D], got "
            f"{tuple(patch_embed.shape)}, {tuple(prompt_embed.shape)}"
        )
    b, k = prompt_embed.shape[:2]
    if patch_embed.shape[0] != b or patch_embed.shape[2] != prompt_embed.shape[2]:
        raise ValueError(f"batch and embedding sizes differ: patch_embed {tuple(patch_embed.shape)}, "
                         f"prompt_embed {tuple(prompt_embed.shape)}")
    if prompt_mask.shape != (b, k) or prompt_mask.dtype != torch.bool:
        raise ValueError(
            f"prompt_mask must be a bool [B={b}, K={k}], got {prompt_mask.dtype} {tuple(prompt_mask.shape)}"
        )
    if scope == "image" and teacher is None:
        raise ValueError("grounded_patch_loss: scope='image' makes every patch its own teacher (zero gradient); "
                         "use 'batch' or 'noun', or pass a teacher")
    _check_scope(scope, prompt_ids, prompt_mask)
    vocab = _vocab(vocab_mask, prompt_mask, scope)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
    if teach_on is not None and (teach_on.shape != prompt_mask.shape or teach_on.dtype != torch.bool):
        raise ValueError(f"teach_on must be a bool [B={b}, K={k}], got {teach_on.dtype} {tuple(teach_on.shape)}")
    target = _teacher(patch_embed, prompt_embed, prompt_mask, scale, teacher, labels, cam_threshold)  # [B, L, K]
    if teach_on is None and threshold == 0.0:
        per_pos = _student_loss(patch_embed, target, prompt_embed, prompt_mask, scale, scope, prompt_ids, vocab)
        return _image_mean(per_pos, prompt_mask, _labelled(target, labels, teacher))
    with torch.no_grad():
        prob, best = target.max(-1)  # [B, L]
        taught = prob > threshold
        if teach_on is not None:
            taught &= torch.gather(teach_on.to(best.device), 1, best)
        taught &= (prompt_mask.sum(-1) >= 2).to(best.device)[:, None]
        target = F.one_hot(best, k).to(target.dtype) * taught[..., None]  # [B, L, K]
    per_pos = _student_loss(patch_embed, target, prompt_embed, prompt_mask, scale, scope, prompt_ids, vocab)  # [B, L]
    return (per_pos * taught).sum() / taught.sum().clamp_min(1)


def _check_scope(scope: str, prompt_ids: torch.Tensor | None, prompt_mask: torch.Tensor) -> None:
    if scope not in GROUNDED_SCOPES:
        raise ValueError(f"scope must be one of {GROUNDED_SCOPES}, got {scope!r}")
    if scope != "image" and (prompt_ids is None or prompt_ids.shape != prompt_mask.shape):
        raise ValueError(f"scope={scope!r} needs prompt_ids shaped like prompt_mask {tuple(prompt_mask.shape)}")


@torch.no_grad()
def teacher_labels(
    patch_embed: torch.Tensor,
    prompt_embed: torch.Tensor,
    prompt_mask: torch.Tensor,
    scale: torch.Tensor | float,
    labels: str = "soft",
    cam_threshold: float = 0.7,
) -> torch.Tensor:
    """``[B, L, K]`` each patch's label over its image's noun prompts, from the similarities
    ``patch_embed [B, L, D] . prompt_embed [B, K, D]`` (normalised), zero on the masked prompts.

    ``labels="soft"``: the softmax over the image's prompts at ``scale``; every row sums to 1.

    ``labels="cam"``: hard labels by the weakly-supervised segmentation rule (class activation maps
    thresholded): each prompt's similarity is min-max normalised over the image's patches, so every
    named noun claims the patches where it is relatively strongest, however similar the image's
    patches are overall; a patch takes the prompt with the highest normalised value, and is left
    unlabelled (a zero row) where that value is at most ``cam_threshold``. Against the softmax, this
    stops an object's prompt from claiming the background where the patches' absolute similarities
    are alike (the tiny recipe's teacher labelled three times as many patches "object" as there are;
    docs/investigation/LOG.md, session 14), and leaves the background of a caption that does not
    name it unlabelled instead of wrong.
    """
    if labels not in GROUNDED_LABELS:
        raise ValueError(f"labels must be one of {GROUNDED_LABELS}, got {labels!r}")
    mask = prompt_mask.to(patch_embed.device)[:, None, :]  # [B, 1, K]
    sim = torch.einsum("bld,bkd->blk", patch_embed.float(), prompt_embed.float())  # [B, L, K]
    if labels == "soft":
        return (sim * scale).masked_fill(~mask, _MASKED).softmax(-1) * mask
    if not 0.0 <= cam_threshold < 1.0:
        raise ValueError(f"cam_threshold must be in [0, 1), got {cam_threshold!r}")
    lo, hi = sim.amin(1, keepdim=True), sim.amax(1, keepdim=True)  # [B, 1, K] over the image's patches
    cam = ((sim - lo) / (hi - lo).clamp_min(1e-6)).masked_fill(~mask, -1.0)  # [B, L, K] in [0, 1]; masked -1
    value, best = cam.max(-1)  # [B, L]
    return F.one_hot(best, sim.shape[-1]).to(sim.dtype) * (value > cam_threshold)[..., None]


@torch.no_grad()
def _teacher(patch_embed, prompt_embed, prompt_mask, scale, teacher=None, labels="soft",
             cam_threshold=0.7) -> torch.Tensor:
    """``[B, L, K]`` labels over each image's noun prompts (:func:`teacher_labels`), read from
    ``teacher = (patch_embed, prompt_embed)`` of another model when given, or ``teacher`` itself
    when it is that ``[B, L, K]`` label tensor."""
    if isinstance(teacher, torch.Tensor):
        want = (*patch_embed.shape[:2], prompt_embed.shape[1])
        if teacher.shape != want:
            raise ValueError(f"teacher labels must be [B, L, K] = {list(want)}, got {tuple(teacher.shape)}")
        return teacher.to(patch_embed.device, torch.float32) * prompt_mask.to(patch_embed.device)[:, None, :]
    if teacher is not None:
        t_patch, t_prompt = teacher
        if t_patch.shape != patch_embed.shape or t_prompt.shape != prompt_embed.shape:
            raise ValueError(
                f"the teacher's embeddings must be shaped as the student's: patch {tuple(t_patch.shape)} vs "
                f"{tuple(patch_embed.shape)}, prompt {tuple(t_prompt.shape)} vs {tuple(prompt_embed.shape)}"
            )
        patch_embed, prompt_embed = t_patch, t_prompt
    return teacher_labels(patch_embed, prompt_embed, prompt_mask, scale, labels, cam_threshold)


def _vocab(vocab_mask: torch.Tensor | None, prompt_mask: torch.Tensor, scope: str) -> torch.Tensor:
    """The students' prompts: ``vocab_mask & prompt_mask`` (default ``prompt_mask``), checked."""
    if vocab_mask is None:
        return prompt_mask
    if scope == "image":
        raise ValueError("vocab_mask needs scope 'batch' or 'noun' (in the image scope a student's prompts are "
                         "its own image's, each its own teacher's class)")
    if vocab_mask.shape != prompt_mask.shape or vocab_mask.dtype != torch.bool:
        raise ValueError(f"vocab_mask must be a bool {tuple(prompt_mask.shape)}, got {vocab_mask.dtype} "
                         f"{tuple(vocab_mask.shape)}")
    return vocab_mask.to(prompt_mask.device) & prompt_mask


def _student_loss(pos, target, prompt_embed, prompt_mask, scale, scope, prompt_ids, vocab) -> torch.Tensor:
    """``[B, N]`` soft cross-entropy from ``target [B, N, K]`` to each student of ``pos [B, N, D]``."""
    b, k = prompt_mask.shape
    if scope == "image":
        mask = prompt_mask.to(pos.device)[:, None, :]  # [B, 1, K]
        logits = torch.einsum("bnd,bkd->bnk", pos.float(), prompt_embed.float()) * scale
        logp = logits.masked_fill(~mask, _MASKED).log_softmax(-1)
    else:
        logp = _vocab_logp(pos, prompt_embed, vocab, scale)  # [B, N, B*K]
        with torch.no_grad():
            spread = _share_by_id(prompt_ids.to(pos.device), vocab.to(pos.device)).view(b, k, b * k)
            target = torch.einsum("bnk,bkm->bnm", target, spread)  # [B, N, B*K]
    return -(target * logp).sum(-1)  # [B, N]


def _labelled(target: torch.Tensor, labels: str, teacher) -> torch.Tensor | None:
    """``[B, N]`` 1 where the teacher labelled a position, with hard ``"cam"`` labels from embeddings
    (their zero rows are "no label"); None otherwise (every position counts, as before)."""
    if labels != "cam" or isinstance(teacher, torch.Tensor):
        return None
    return target.sum(-1)


def _image_mean(per_pos: torch.Tensor, prompt_mask: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions (those with ``weight`` 1 when given), then over the images with at least
    two noun prompts and a weighted position (0 if none)."""
    counts = prompt_mask.sum(-1).to(per_pos.device) >= 2
    if weight is None:
        per_image = per_pos.mean(-1)
    else:
        per_image = (per_pos * weight).sum(-1) / weight.sum(-1).clamp_min(1)
        counts = counts & (weight.sum(-1) > 0)
    return (per_image * counts).sum() / counts.sum().clamp_min(1)


def grounded_mixed_loss(
    patch_embed: torch.Tensor,
    seg_embed: torch.Tensor,
    assign: torch.Tensor,
    src: torch.Tensor,
    prompt_embed: torch.Tensor,
    prompt_mask: torch.Tensor,
    scale: torch.Tensor | float,
    *,
    scope: str = "noun",
    prompt_ids: torch.Tensor | None = None,
    teacher: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None,
    vocab_mask: torch.Tensor | None = None,
    labels: str = "soft",
    cam_threshold: float = 0.7,
) -> torch.Tensor:
    """The grounded term on MixReorg's MIXED images: each mixed position is named by the teacher's label
    of the original patch it came from.

    MixReorg's L_seg names every mixed patch by its source image's CAPTION, which asks the grouping to
    keep each source together; the grounded term on the original images asks the same grouping to
    split a source by noun (docs/investigation/LOG.md, session 11). Here the mixed image's known
    per-patch labels are its sources' NOUNS instead: a patch from image ``j`` that ``j``'s caption
    lets call "red circle" must, through its segment in the mixed image, score every circle prompt
    of the batch above every other noun. [R], not in the paper.

    Args:
        patch_embed: ``[B, L, D]`` the ORIGINAL images' normalised patch embeddings (the teacher, no
            gradient), on the ``h x h`` grid the mixing acts on.
        seg_embed, assign: the mixed branch's ``[B, S, D]`` segments and ``[B, S, N]`` composed hard
            map (``N = H x H``, ``H`` a multiple of ``h``).
        src: ``[B, L]`` the batch row each mixed patch was read from (``MixPlan.src``); patches keep
            their position.
        prompt_embed, prompt_mask, scale, scope, prompt_ids, teacher, vocab_mask, labels, cam_threshold: as
            :func:`grounded_seg_loss`;
            ``scope`` ``"batch"`` or ``"noun"`` (a mixed image has no caption of its own).

    The mean is over the mixed positions whose source names at least two nouns (0 with a zero
    gradient when none does). Under ``torch.distributed`` everything is the rank's own (MixReorg
    mixes within a rank's batch; nothing is gathered).
    """
    _check(patch_embed, seg_embed, assign, prompt_embed, prompt_mask)
    if scope == "image":
        raise ValueError("grounded_mixed_loss: a mixed image has no prompts of its own; use scope 'batch' or 'noun'")
    _check_scope(scope, prompt_ids, prompt_mask)
    vocab = _vocab(vocab_mask, prompt_mask, scope)
    b, length = patch_embed.shape[:2]
    k = prompt_mask.shape[1]
    if src.shape != (b, length) or src.dtype != torch.long:
        raise ValueError(f"src must be int64 [B={b}, L={length}], got {src.dtype} {tuple(src.shape)}")
    h, big = _grids(patch_embed, assign)
    src = src.to(patch_embed.device)
    with torch.no_grad():
        teach = _teacher(patch_embed, prompt_embed, prompt_mask, scale, teacher, labels, cam_threshold)  # [B, L, K]
        moved = teach[src, torch.arange(length, device=src.device)]  # [B, L, K]: each mixed patch's label
        flat = moved.new_zeros(b, length, b, k)
        flat.scatter_(2, src[:, :, None, None].expand(b, length, 1, k), moved[:, :, None, :])
        valid = (prompt_mask.to(src.device).sum(-1) >= 2)[src].float()  # [B, L] source names >= 2 nouns
        labelled = _labelled(moved, labels, teacher)
        if labelled is not None:  # hard "cam" labels: the unlabelled patches teach nothing
            valid = valid * labelled
        target = flat.reshape(b, length, b * k) @ _share_by_id(prompt_ids.to(src.device), vocab.to(src.device))
        target = _to_grouped_grid(target, h, big)  # [B, N, B*K]
        valid = _to_grouped_grid(valid[..., None], h, big)[..., 0]  # [B, N]
    pos = torch.einsum("bsn,bsd->bnd", assign.to(seg_embed.dtype), seg_embed)  # [B, N, D]
    logp = _vocab_logp(pos, prompt_embed, vocab, scale)  # [B, N, B*K]
    per_pos = -(target * logp).sum(-1)  # [B, N]
    return (per_pos * valid).sum() / valid.sum().clamp_min(1)
