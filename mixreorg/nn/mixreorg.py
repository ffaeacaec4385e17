"""The MixReorg image encoder: contextual mixing, progressive mixing, mixing restoration.

Three branches share every weight of a GroupViT backbone (DESIGN.md section 5)::

    images -> patch embed -> [patches; group tokens] -> contextual block -> x_o
      original  x_o ------ blk_1 ------ blk_2 ... blk_D -------------> grouping, stages 2.. -> L_contrast
                 | mix       | mix_add    | mix_add
      mixed     x_m ------ blk_1 ------ blk_2 ... blk_D --> restore -> grouping, stages 2.. -> L_seg
                (own group tokens)                           |
      restored                                    x_r <------'------> grouping, stages 2.. -> L_contrast
                (borrows the original branch's group tokens; all blocks shared)

* contextual mixing: ONE extra transformer block on ``[patches; group tokens]`` before mixing,
  so every patch carries its image's context; then the patch tokens are mixed (``MixPlan``);
* progressive mixing: after each of the first ``P`` stage-1 blocks the mixed tokens are
  enhanced by the re-mixed original tokens of the same depth, ``x_m = x_m + mix(x_o)`` (fused
  ``mix_add``; options: ``concat`` + Linear, or ``add_detach``: stop-gradient on ``x_o``);
* restoration at the end of stage 1: ``x_r = restore(x_m)``, with the original's group tokens.

The same plan serves every mix and restore of a step. In eval mode only the original branch
runs: :meth:`MixReorg.encode_image` costs exactly a GroupViT with one more stage-1 block
(:meth:`MixReorg.to_groupvit` builds that model with the same weights).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from ..ops.plan import MixPlan
from .groupvit import GroupViT, compose_assignments
from .mixer import MixedPatchMixer
from .vision import init_linear_and_norm

__all__ = ["MixReorgConfig", "MixReorg", "PROGRESSIVE_MODES"]

PROGRESSIVE_MODES = ("add", "add_detach", "concat")


@dataclass
class MixReorgConfig:
    """Switches of the MixReorg encoder (the paper's ablations).

    Attributes:
        group_size: images mixed together ``G`` (paper: 16; Fig. 5).
        contextual: contextual mixing, the extra block before mixing (Table 6 "CM").
        progressive: number ``P`` of progressive mixing modules, ``0..depth of stage 1``
            (``None``: all of stage 1, the paper's best; Fig. 5).
        progressive_mode: ``"add" | "add_detach" | "concat"``.
        mix_impl: backend of the mixing ops (``"auto" | "triton" | "torch"``).
        seg_maps: which composed patch -> segment map the mixed segmentation loss uses: ``"hard"``
            (straight-through one-hot, as GroupViT trains; [R]) or ``"soft"`` (the noise-free
            softmax maps, as zero-shot inference uses).
        mixed_group_tokens: ``"own"`` (the paper: the mixed branch has its own copy of the stage-1
            group tokens) or ``"shared"`` [R] (it starts from the original branch's, so that the
            grouping L_seg trains -- telling apart the patches of different images -- is learned by
            the group tokens zero-shot inference uses).

    Every branch pools its image vector as the backbone's ``GroupViT.image_pool`` says.
    """

    group_size: int = 16
    contextual: bool = True
    progressive: int | None = None
    progressive_mode: str = "add"
    mix_impl: str = "auto"
    seg_maps: str = "hard"
    mixed_group_tokens: str = "own"


class MixReorg(nn.Module):
    """MixReorg on a :class:`GroupViT` (image + text towers, heads, temperature).

    Args:
        groupvit: the backbone (a :class:`GroupViT`, or a dict of its arguments).
        config: :class:`MixReorgConfig` (or a dict of its fields).
    """

    def __init__(self, groupvit: GroupViT | dict | None = None, config: MixReorgConfig | dict | None = None) -> None:
        super().__init__()
        if groupvit is None or isinstance(groupvit, dict):
            groupvit = GroupViT(**(groupvit or {}))
        if config is None or isinstance(config, dict):
            config = dict(config or {})
            if "image_pool" in config:
                raise ValueError("image_pool is an option of the GroupViT backbone (GroupViT(image_pool=...)), "
                                 "not of MixReorgConfig: every branch pools as the backbone does")
            config = MixReorgConfig(**config)
        enc = groupvit.vision
        stage = enc.stages[0]
        depth = len(stage.blocks)
        if stage.group_token is None:
            raise ValueError("MixReorg needs a backbone whose first stage has group tokens")
        P = depth if config.progressive is None else config.progressive
        if not 0 <= P <= depth:
            raise ValueError(f"progressive={config.progressive}: the number of progressive mixing modules must be "
                             f"in [0, {depth}] (the depth of stage 1)")
        if config.progressive_mode not in PROGRESSIVE_MODES:
            raise ValueError(f"progressive_mode must be one of {PROGRESSIVE_MODES}, got {config.progressive_mode!r}")
        if config.seg_maps not in ("hard", "soft"):
            raise ValueError(f"seg_maps must be 'hard' or 'soft', got {config.seg_maps!r}")
        if config.mixed_group_tokens not in ("own", "shared"):
            raise ValueError(f"mixed_group_tokens must be 'own' or 'shared', got {config.mixed_group_tokens!r}")
        if config.contextual and depth == 0:
            raise ValueError("contextual mixing copies a stage-1 block: stage 1 needs at least one block")
        self.groupvit = groupvit
        self.config = config
        self.num_progressive = P
        C = enc.embed_dim
        # mixer first (it validates group_size and warns for G = 1)
        self.mixer = MixedPatchMixer(config.group_size, impl=config.mix_impl)
        # one more block of exactly the stage-1 kind, freshly initialised
        self.context_block = self._fresh_block(stage.blocks[0]) if config.contextual else None
        # the mixed branch's own copy of the stage-1 group tokens
        if config.mixed_group_tokens == "own":
            self.mixed_group_token = nn.Parameter(torch.empty_like(stage.group_token))
            nn.init.trunc_normal_(self.mixed_group_token, std=0.02)
        else:  # nothing to train: DDP refuses parameters that get no gradient
            self.register_parameter("mixed_group_token", None)
        if config.progressive_mode == "concat":
            self.fuse = nn.ModuleList(nn.Linear(2 * C, C) for _ in range(P))
            for lin in self.fuse:  # starts as x_m + mix(x_o)
                with torch.no_grad():
                    lin.weight.copy_(torch.cat([torch.eye(C), torch.eye(C)], dim=1))
                    lin.bias.zero_()
        else:
            self.fuse = None

    @staticmethod
    def _fresh_block(template: nn.Module) -> nn.Module:
        blk = copy.deepcopy(template)
        blk.apply(init_linear_and_norm)
        if hasattr(blk, "drop_path"):
            blk.drop_path = nn.Identity()
        return blk

    # ------------------------------------------------------------------ conveniences
    @property
    def vision(self):
        return self.groupvit.vision

    @property
    def group_size(self) -> int:
        return self.config.group_size

    def scale(self) -> torch.Tensor:
        return self.groupvit.scale()

    def multi_label_scale(self) -> torch.Tensor:
        return self.groupvit.multi_label_scale()

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.groupvit.logit_scale

    @property
    def use_checkpoint(self) -> bool:
        return self.groupvit.use_checkpoint

    @use_checkpoint.setter
    def use_checkpoint(self, flag: bool) -> None:
        self.groupvit.use_checkpoint = flag

    def no_weight_decay(self) -> set[str]:
        names = {f"groupvit.vision.{n}" for n in self.vision.no_weight_decay()}
        return names | ({"mixed_group_token"} if self.mixed_group_token is not None else set())

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.groupvit.encode_text(token_ids)

    def _run(self, blk: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return self.vision.stages[0].run_block(blk, h)

    # ------------------------------------------------------------------ original branch only
    def _stage1_input(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None, torch.Tensor]:
        """``(h [B, L + S, C] after the contextual block, group tokens, L, skip, x)``; ``skip`` is the
        encoder's fine-grouping skip ``[B, L, f*f*C]`` (None without ``group_patch_size``), ``x [B, L, C]``
        the embedded patches before the contextual block (local features, for a per-patch loss)."""
        enc = self.vision
        x, skip = enc.embed_with_skip(images)  # [B, L, C]
        g = enc.stages[0].init_group_tokens(x.shape[0])  # [B, S, C]
        L = x.shape[1]
        h = torch.cat([x, g], dim=1)  # [B, L + S, C]
        if self.context_block is not None:
            h = self._run(self.context_block, h)
        return h, g, L, skip, x

    def encode_image(self, images: torch.Tensor, return_maps: bool = False) -> dict:
        """The original branch alone (inference): same output dict as ``GroupViT.encode_image``."""
        enc = self.vision
        grid = enc.patch_embed.grid_for(images)
        h, _, L, skip, _ = self._stage1_input(images)
        for blk in enc.stages[0].blocks:
            h = self._run(blk, h)
        assigned = self.groupvit.image_pool == "assigned"  # assigned pooling reads the maps
        out = enc.forward_from_stage1_output(
            h[:, :L], h[:, L:], return_maps=return_maps or assigned, grid=grid, skip=skip
        )
        out = self.groupvit.project_image(self.groupvit.pool(out), with_seg=return_maps)
        if not return_maps:
            out["hard_maps"], out["soft_maps"] = [], []
        return out

    def to_groupvit(self) -> GroupViT:
        """A :class:`GroupViT` with one more stage-1 block (the contextual block first) holding
        these weights: "GroupViT+", the inference model of MixReorg (Table 6), pooled as the
        backbone is."""
        if self.context_block is None:
            return copy.deepcopy(self.groupvit)
        gv = copy.deepcopy(self.groupvit)
        stage = gv.vision.stages[0]
        stage.blocks = nn.ModuleList([copy.deepcopy(self.context_block), *stage.blocks])
        gv.vision.depths = (gv.vision.depths[0] + 1, *gv.vision.depths[1:])
        return gv

    # ------------------------------------------------------------------ training: three branches
    def make_plan(self, batch_size: int, grid: tuple[int, int], device, generator=None) -> MixPlan:
        return MixPlan.create(batch_size, grid[0] * grid[1], self.group_size, grid=grid,
                              generator=generator, device=device)

    def _progressive(self, k: int, x_m: torch.Tensor, x_o: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        mode = self.config.progressive_mode
        if mode == "add":
            return self.mixer.mix_add(x_m, x_o, plan)  # fused x_m + mix(x_o)
        if mode == "add_detach":
            return self.mixer.mix_add(x_m, x_o.detach(), plan)
        mixed_o, _ = self.mixer(x_o, plan)
        return self.fuse[k](torch.cat([x_m, mixed_o], dim=-1))

    def forward_branches(self, images: torch.Tensor, plan: MixPlan | None = None,
                         generator: torch.Generator | None = None) -> dict:
        """Run the original, mixed and restored branches.

        Returns ``dict(original=..., mixed=..., restored=..., plan=MixPlan, grid=(h, w))`` where
        each branch is the projected output dict (``image_embed [B, D]``, ``seg_embed
        [B, S, D]``, ``hard_maps``, ``soft_maps``, ``tokens``, ``pooled`` and ``assign``, the composed
        hard map ``[B, S_final, N_0]``), plus
        ``stage1`` = dict of the stage-1 patch tokens of each branch (for tests and analysis), and
        ``embed_tokens [B, L, C]``: the original images' embedded patches before any block.
        """
        enc = self.vision
        grid = enc.patch_embed.grid_for(images)
        B = images.shape[0]
        if B % self.group_size != 0:
            raise ValueError(f"MixReorg: batch size {B} is not divisible by the group size {self.group_size}")
        with record_function("mixreorg/embed+context"):
            h, _, L, skip, embed_tokens = self._stage1_input(images)  # [B, L + S, C] after the contextual block
        x_o, g_o = h[:, :L], h[:, L:]
        if plan is None:
            plan = self.make_plan(B, grid, images.device, generator)
        with record_function("mixreorg/stage1 (original+mixed)"):
            x_m, _ = self.mixer(x_o, plan)  # [B, L, C] mixed patches
            if self.config.mixed_group_tokens == "shared":
                g_m = g_o  # the original's group tokens (after the contextual block)
            else:
                g_m = self.mixed_group_token.expand(B, -1, -1).to(x_m.dtype)
            for k, blk in enumerate(enc.stages[0].blocks):
                # both branches through the shared block in one call: [2B, L + S, C]
                h = self._run(blk, torch.cat([torch.cat([x_o, g_o], 1), torch.cat([x_m, g_m], 1)], 0))
                x_o, g_o, x_m, g_m = h[:B, :L], h[:B, L:], h[B:, :L], h[B:, L:]
                if k < self.num_progressive:
                    x_m = self._progressive(k, x_m, x_o, plan)
            x_r = self.mixer.restore(x_m, plan)  # every patch back in its own image
        with record_function("mixreorg/grouping+stages2.. (3 branches)"):
            # a fine-grouping encoder's skip features move with their patch: mixed for the mixed branch
            skips = None if skip is None else torch.cat([skip, self.mixer(skip, plan)[0], skip], 0)
            out = enc.forward_from_stage1_output(
                torch.cat([x_o, x_m, x_r], 0), torch.cat([g_o, g_m, g_o], 0), return_maps=True, grid=grid,
                skip=skips,
            )
        with record_function("mixreorg/projection heads"):
            out = self.groupvit.project_image(self.groupvit.pool(out), with_seg=True)
        branches = {}
        for i, name in enumerate(("original", "mixed", "restored")):
            sl = slice(i * B, (i + 1) * B)
            branches[name] = {
                "image_embed": out["image_embed"][sl],
                "seg_embed": out["seg_embed"][sl],
                "tokens": out["tokens"][sl],
                "pooled": out["pooled"][sl],
                "hard_maps": [m[sl] for m in out["hard_maps"]],
                "soft_maps": [m[sl] for m in out["soft_maps"]],
            }
            branches[name]["assign"] = compose_assignments(branches[name]["hard_maps"])  # [B, S_final, N_0]
        branches.update(plan=plan, grid=grid, stage1={"original": x_o, "mixed": x_m, "restored": x_r},
                        embed_tokens=embed_tokens)
        return branches

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor, prompt_ids: torch.Tensor | None = None,
                plan: MixPlan | None = None, generator: torch.Generator | None = None,
                patch_embed: bool = False, branch_patches: str | None = None) -> dict:
        """Training forward: the three branches plus text embeddings.

        Returns the :meth:`forward_branches` dict with ``text_embed [B, D]``, ``prompt_embed
        [B, K, D]`` (or None), ``logit_scale`` and ``multi_label_logit_scale`` (log space), and
        ``mixed_assign [B, S_final, N_0]``: the composed assignment of the mixed branch (token ->
        final segment; hard straight-through or soft, ``config.seg_maps``), and ``mixed_labels
        [B, N_0]``, the source of each of those tokens (:meth:`mixed_labels`): what the mixed
        segmentation loss uses. ``N_0 = L`` unless the encoder groups a finer grid. With
        ``patch_embed``, also ``mixed_patch_embed [B, L, D]``: the mixed branch's stage-1 patch tokens
        through the final norm and the image head, normalised (the patch-level L_seg reads them; only
        on request, since a head with BatchNorm would update its statistics with them). With
        ``branch_patches="stage1"`` (or ``"embed"``), ``out[b]["patch_embed"] [B, L, D]`` likewise for
        the original and restored branches, from their stage-1 tokens (or the embedded patches before
        any block: the restored branch's are then the original's, since restore undoes mix): what a
        per-patch image-text term reads.
        """
        out = self.forward_branches(images, plan, generator)
        if patch_embed:
            out["mixed_patch_embed"] = self.groupvit.project_patches(out["stage1"]["mixed"])  # [B, L, D]
        if branch_patches == "embed":
            emb = self.groupvit.project_patches(out["embed_tokens"])  # [B, L, D]
            out["original"]["patch_embed"] = out["restored"]["patch_embed"] = emb
        elif branch_patches == "stage1":
            for name in ("original", "restored"):
                out[name]["patch_embed"] = self.groupvit.project_patches(out["stage1"][name])  # [B, L, D]
        elif branch_patches is not None:
            raise ValueError(f"branch_patches must be None, 'stage1' or 'embed', got {branch_patches!r}")
        # two text passes, as the GroupViT trainer: captions and prompts may have other lengths
        out["text_embed"] = self.encode_text(token_ids)  # [B, D]
        out["prompt_embed"] = self.encode_text(prompt_ids) if prompt_ids is not None else None  # [B, K, D]
        gv = self.groupvit
        out["logit_scale"] = gv.logit_scale
        ml = gv.multi_label_logit_scale if gv.multi_label_logit_scale is not None else gv.logit_scale
        out["multi_label_logit_scale"] = ml
        out["mixed_assign"] = compose_assignments(out["mixed"][f"{self.config.seg_maps}_maps"])
        out["mixed_labels"] = self.mixed_labels(out["plan"])
        return out

    def mixed_labels(self, plan: MixPlan) -> torch.Tensor:
        """Source image (in its group) of every token the first grouping assigns ``[B, N_0]``: the plan's
        labels, each repeated over the ``f x f`` fine tokens of its patch for a fine-grouping encoder."""
        f = self.vision.fine_factor
        return plan.labels if f == 1 else plan.pixel_labels(f).flatten(1)  # [B, (h f)(w f)]
