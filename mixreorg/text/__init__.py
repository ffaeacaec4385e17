"""mixreorg.text: the CLIP tokenizer, noun extraction and prompt templates (all offline)."""

from __future__ import annotations

from mixreorg.text.nouns import ADJECTIVES, STOP_WORDS, extract_nouns, nltk_available, noun_phrases
from mixreorg.text.prompts import (
    IMAGENET_TEMPLATES,
    IMAGENET_TEMPLATES_7,
    PROMPT_TEMPLATES,
    SEGMENTATION_TEMPLATES,
    make_prompts,
)
from mixreorg.text.tokenizer import (
    CONTEXT_LENGTH,
    EOT_TOKEN_ID,
    SOT_TOKEN_ID,
    VOCAB_SIZE,
    ClipTokenizer,
    clean_text,
    find_open_clip_bpe,
    get_tokenizer,
    tokenize,
)

__all__ = [
    "ADJECTIVES",
    "CONTEXT_LENGTH",
    "EOT_TOKEN_ID",
    "IMAGENET_TEMPLATES",
    "IMAGENET_TEMPLATES_7",
    "PROMPT_TEMPLATES",
    "SEGMENTATION_TEMPLATES",
    "SOT_TOKEN_ID",
    "STOP_WORDS",
    "VOCAB_SIZE",
    "ClipTokenizer",
    "clean_text",
    "extract_nouns",
    "find_open_clip_bpe",
    "get_tokenizer",
    "make_prompts",
    "nltk_available",
    "noun_phrases",
    "tokenize",
]
