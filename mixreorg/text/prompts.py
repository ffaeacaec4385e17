"""Prompt templates and the multi-label prompts of GroupViT's multi-label contrastive loss.

``make_prompts(caption, k=3, rng)`` draws up to ``k`` distinct nouns of the caption (without
replacement) and puts each into a template drawn at random from :data:`PROMPT_TEMPLATES`; with fewer
than ``k`` nouns the caption itself fills the remaining slots (GroupViT's rule). Deterministic for a
given ``rng`` (an int seed, ``random.Random`` or ``torch.Generator``).

The template strings are the ImageNet prompt ensemble published with OpenAI's CLIP (MIT licence),
which GroupViT uses for its multi-label texts ("full" set, 80) and for zero-shot classification.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import torch

from mixreorg.text.nouns import extract_nouns

__all__ = [
    "PROMPT_TEMPLATES",
    "IMAGENET_TEMPLATES",
    "IMAGENET_TEMPLATES_7",
    "SEGMENTATION_TEMPLATES",
    "make_prompts",
]

# OpenAI CLIP's 80 ImageNet prompt templates (MIT licence).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# CLIP's 7-template subset (the "subset" set of GroupViT).
IMAGENET_TEMPLATES_7: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of a {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# Zero-shot segmentation prompt (GroupViT).
SEGMENTATION_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

# Templates of the multi-label prompts (GroupViT default: the full set).
PROMPT_TEMPLATES: tuple[str, ...] = IMAGENET_TEMPLATES


def _choice_indices(rng: random.Random | torch.Generator, n: int, m: int) -> list[int]:
    """``m`` distinct indices out of ``range(n)``, in random order."""
    if isinstance(rng, torch.Generator):
        return torch.randperm(n, generator=rng)[:m].tolist()
    return rng.sample(range(n), m)


def _randint(rng: random.Random | torch.Generator, n: int) -> int:
    if isinstance(rng, torch.Generator):
        return int(torch.randint(n, (1,), generator=rng).item())
    return rng.randrange(n)


def make_prompts(
    caption: str,
    k: int = 3,
    rng: int | random.Random | torch.Generator | None = None,
    *,
    nouns: Sequence[str] | None = None,
    vocabulary: Iterable[str] | None = None,
    templates: Sequence[str] = PROMPT_TEMPLATES,
    return_nouns: bool = False,
) -> list[str] | tuple[list[str], list[str | None]]:
    """``k`` multi-label prompts for ``caption``.

    Args:
        caption: the image caption.
        k: number of prompts (GroupViT: 3).
        rng: randomness source: an int seed, ``random.Random``, ``torch.Generator``; None uses
            a generator seeded from Python's global ``random`` state.
        nouns: the caption's nouns when already known; default ``extract_nouns(caption, vocabulary)``.
        vocabulary: passed to :func:`~mixreorg.text.nouns.extract_nouns`.
        templates: strings with one ``{}``.

        return_nouns: also return which noun each prompt was built from (None for the caption
            fillers): the only reliable way to know it, since template words can be nouns too
            ("a painting of the dog." holds "painting").

    Returns:
        ``k`` strings: ``min(k, len(nouns))`` template prompts for distinct nouns, then the caption
        repeated for the remaining slots; with ``return_nouns``, ``(prompts, nouns)``.
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a str, got {type(caption).__name__}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not templates:
        raise ValueError("templates is empty")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"each template needs exactly one '{{}}' placeholder, got {t!r}")
    if rng is None:
        rng = random.Random(random.getrandbits(64))  # seeded from Python's global generator
    elif isinstance(rng, int) and not isinstance(rng, bool):
        rng = random.Random(rng)
    elif not isinstance(rng, (random.Random, torch.Generator)):
        raise ValueError(f"rng must be an int, random.Random or torch.Generator, got {type(rng).__name__}")
    if nouns is None:
        nouns = extract_nouns(caption, vocabulary)
    nouns = list(dict.fromkeys(nouns))
    picked = [nouns[i] for i in _choice_indices(rng, len(nouns), min(k, len(nouns)))]
    prompts = [templates[_randint(rng, len(templates))].format(noun) for noun in picked]
    fill = k - len(prompts)
    if return_nouns:
        return prompts + [caption] * fill, [*picked, *([None] * fill)]
    return prompts + [caption] * fill
