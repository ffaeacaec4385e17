"""mixreorg.text: CLIP tokenizer ids, truncation, the BPE fallback backend, nouns and prompts."""

from __future__ import annotations

import gzip
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixreorg.text import (
    EOT_TOKEN_ID,
    IMAGENET_TEMPLATES,
    IMAGENET_TEMPLATES_7,
    PROMPT_TEMPLATES,
    SOT_TOKEN_ID,
    STOP_WORDS,
    ClipTokenizer,
    clean_text,
    extract_nouns,
    find_open_clip_bpe,
    get_tokenizer,
    make_prompts,
    nltk_available,
    noun_phrases,
    tokenize,
)
from mixreorg.text.nouns import phrase_heads

# ---------------------------------------------------------------- tokenizer


def test_known_clip_ids():
    ids = tokenize("a photo of a cat.")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    # a</w>=320 photo</w>=1125 of</w>=539 cat</w>=2368 .</w>=269 in the CLIP vocabulary
    assert ids[0, :8].tolist() == [SOT_TOKEN_ID, 320, 1125, 539, 320, 2368, 269, EOT_TOKEN_ID]
    assert (ids[0, 8:] == 0).all()
    assert (SOT_TOKEN_ID, EOT_TOKEN_ID) == (49406, 49407)
    assert tokenize("!")[0, :3].tolist() == [49406, 256, 49407]  # first byte token with </w>


def test_cleaning_matches_open_clip():
    assert clean_text("  Hello\t\n  WORLD &amp;amp; you  ") == "hello world & you"
    a = tokenize(["A  Photo of a CAT.", "a photo of a cat."])
    assert torch.equal(a[0], a[1])


def test_cleaning_looks_for_ftfy_once():
    """Python does not cache a failed import: without the cache every text searched ``sys.path`` for
    ftfy again (the batch builder took 2.4x as long: ``benchmarks/bench_batch_builder.py``)."""
    import sys

    from mixreorg.text import tokenizer

    lookups = []

    class Recorder:
        def find_spec(self, name, path=None, target=None):
            if name == "ftfy":
                lookups.append(name)
            return None  # let the real finders answer

    tokenizer._ftfy_fix_text.cache_clear()
    sys.meta_path.insert(0, Recorder())
    try:
        for _ in range(5):
            assert clean_text("A  Photo") == "a photo"
    finally:
        sys.meta_path.pop(0)
    assert len(lookups) <= 1  # once if ftfy is not installed, never if it is already imported


def test_truncation_keeps_eot():
    long = "word " * 200
    ids = tokenize([long, "short"])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == SOT_TOKEN_ID and ids[0, -1] == EOT_TOKEN_ID and (ids[0] != 0).all()
    assert (ids[0] == EOT_TOKEN_ID).sum() == 1
    with pytest.raises(ValueError, match="context_length"):
        tokenize(long, truncate=False)
    small = tokenize("a photo of a cat.", context_length=5)
    assert small[0].tolist() == [SOT_TOKEN_ID, 320, 1125, 539, EOT_TOKEN_ID]


def test_empty_and_bad_input():
    assert tokenize("")[0, :3].tolist() == [SOT_TOKEN_ID, EOT_TOKEN_ID, 0]
    assert tokenize([]).shape == (0, 77)
    with pytest.raises(ValueError, match="context_length"):
        tokenize("a", context_length=1)
    with pytest.raises(ValueError, match="texts\\[1\\]"):
        tokenize(["a", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="backend"):
        ClipTokenizer(backend="sentencepiece")
    with pytest.raises(ValueError, match="not found"):
        ClipTokenizer(backend="bpe", bpe_path="/nonexistent/bpe_simple_vocab_16e6.txt.gz")


@settings(deadline=None)
@given(text=st.text(max_size=120), ctx=st.integers(2, 80))
def test_layout_property(text, ctx):
    tok = get_tokenizer()
    row = tok(text, ctx)[0]
    # EOT is the largest id (the text encoder reads its output there); id 0 is a real token ("!"
    # without </w>) as well as the padding, so the length is found from EOT, not from non-zeros
    n = int(row.argmax()) + 1
    assert row[0] == SOT_TOKEN_ID and row[n - 1] == EOT_TOKEN_ID and (row[n:] == 0).all()
    assert (row[1 : n - 1] < SOT_TOKEN_ID).all() and (row[1 : n - 1] >= 0).all()
    full = [SOT_TOKEN_ID, *tok.encode(text), EOT_TOKEN_ID]
    expected = full if len(full) <= ctx else full[: ctx - 1] + [EOT_TOKEN_ID]
    assert row[:n].tolist() == expected


def test_decode_roundtrip_on_words():
    tok = get_tokenizer()
    text = "a small red circle next to two blue squares"
    assert tok.decode(tok(text)[0]) == text


def _tiny_vocab(tmp_path):
    path = tmp_path / "tiny_vocab.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write('"tiny_vocab.txt#version: 0.2\nc a\nca t</w>\n')
    return path


def test_bpe_backend_reads_a_clip_merges_file(tmp_path):
    tok = ClipTokenizer(backend="bpe", bpe_path=_tiny_vocab(tmp_path))
    assert tok.backend == "bpe"
    # 256 byte tokens + 256 byte</w> tokens + 2 merges, then SOT and EOT
    assert (tok.vocab_size, tok.sot_id, tok.eot_id) == (516, 514, 515)
    ids = tok(["a cat!", "cats"], context_length=8)
    # a</w>=320 and !</w>=256 are byte tokens (same ids as in the real vocabulary); cat</w> = merge 2
    assert ids[0].tolist() == [514, 320, 513, 256, 515, 0, 0, 0]
    # "cats": c a -> ca, then t (=83) and s</w> (=256+82) stay: there is no merge "ca t"
    assert ids[1].tolist() == [514, 512, 83, 338, 515, 0, 0, 0]
    assert tok.decode(ids[0]) == "a cat !"


def test_backends_agree_when_open_clip_vocab_present():
    """instant-clip-tokenizer is the default backend; where open_clip's vocabulary file is installed,
    the tokenizers-based fallback must produce the same ids."""
    tok = get_tokenizer()
    assert tok.backend == "instant"
    path = find_open_clip_bpe()
    assert path is None or path.name == "bpe_simple_vocab_16e6.txt.gz"
    if path is not None:
        other = ClipTokenizer(backend="bpe", bpe_path=path)
        texts = ["a photo of a cat.", "It's 2023: the GPU's price is $1,999!", "café 東京 😀", "x" * 300]
        assert torch.equal(tok(texts), other(texts))


# ---------------------------------------------------------------- nouns


@pytest.mark.parametrize(
    ("caption", "nouns"),
    [
        ("A red circle and two blue squares on a striped background.", ["circle", "squares", "background"]),
        ("two dogs playing in the park", ["dogs", "park"]),
        ("a man riding a horse on the beach", ["man", "horse", "beach"]),
        ("a painting of a dog", ["painting", "dog"]),
        ("the sky is blue", ["sky"]),
        ("Kitchen with wooden cabinets and a white refrigerator.", ["kitchen", "cabinets", "refrigerator"]),
        ("", []),
        ("a photo of a", ["photo"]),
    ],
)
def test_heuristic_nouns(caption, nouns):
    assert extract_nouns(caption, method="heuristic") == nouns


def test_vocabulary_nouns():
    vocab = ["circle", "square", "triangle", "traffic light", "berry"]
    got = extract_nouns("Two Circles, a triangle, a traffic lights pole and berries; one circle.", vocab)
    assert got == ["circle", "triangle", "traffic light", "berry"]
    assert extract_nouns("a dog", vocabulary=vocab) == []
    with pytest.raises(ValueError, match="vocabulary"):
        extract_nouns("a circle", vocabulary="circle")
    with pytest.raises(ValueError, match="non-empty"):
        extract_nouns("a circle", vocabulary=["circle", " "])
    with pytest.raises(ValueError, match="vocabulary"):
        extract_nouns("a circle", method="vocabulary")


@pytest.mark.parametrize(
    "caption, nouns, phrases",
    [
        ("a red circle and a big blue square on grass.", ["circle", "square", "grass"],
         ["red circle", "big blue square"]),
        ("there is a circle.", ["circle"], []),
        ("Two RED circles, a red circle and a traffic light.", ["circle", "traffic light"], ["red circle"]),
        ("a dark green traffic lights pole", ["traffic light"], ["dark green traffic light"]),
        ("a red, round circle", ["circle"], ["round circle"]),  # punctuation ends the modifier run
        ("the circle is red", ["circle"], []),  # a predicate is not a modifier
        ("a red square", ["circle"], []),
    ],
)
def test_noun_phrases(caption, nouns, phrases):
    assert noun_phrases(caption, nouns) == phrases


@given(
    adjectives=st.lists(st.sampled_from(["red", "blue", "striped", "big", "dark"]), max_size=3),
    noun=st.sampled_from(["circle", "star", "ring"]),
    tail=st.sampled_from(["", " on grass.", " and a square."]),
)
def test_noun_phrases_keep_the_whole_modifier_run(adjectives, noun, tail):
    caption = "a " + " ".join([*adjectives, noun]) + tail
    got = noun_phrases(caption, [noun, "square", "grass"])
    assert got == ([" ".join([*adjectives, noun])] if adjectives else [])


def test_noun_phrases_refuse_bad_input():
    with pytest.raises(ValueError, match="caption"):
        noun_phrases(None, ["circle"])
    with pytest.raises(ValueError, match="not one str"):
        noun_phrases("a red circle", "circle")
    with pytest.raises(ValueError, match="non-empty"):
        noun_phrases("a red circle", ["circle", ""])


def test_nouns_method_selection():
    with pytest.raises(ValueError, match="method"):
        extract_nouns("a cat", method="spacy")
    with pytest.raises(ValueError, match="str"):
        extract_nouns(None)  # type: ignore[arg-type]
    if nltk_available():
        assert "cat" in extract_nouns("a cat on a mat", method="nltk")
    else:
        with pytest.raises(ValueError, match="nltk"):
            extract_nouns("a cat", method="nltk")
        assert extract_nouns("a cat on a mat") == extract_nouns("a cat on a mat", method="heuristic")


@settings(deadline=None)
@given(
    words=st.lists(
        st.sampled_from(["a", "the", "red", "circle", "and", "dogs", "playing", "on", "grass", ",", "is", "two"]),
        max_size=15,
    )
)
def test_heuristic_nouns_property(words):
    caption = " ".join(words)
    nouns = extract_nouns(caption, method="heuristic")
    assert len(nouns) == len(set(nouns))
    assert all(n in words and n not in STOP_WORDS for n in nouns)


# ---------------------------------------------------------------- prompts


def test_templates():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert set(IMAGENET_TEMPLATES_7) <= set(IMAGENET_TEMPLATES)
    assert all(t.count("{}") == 1 for t in PROMPT_TEMPLATES)
    assert "a photo of a {}." in PROMPT_TEMPLATES


def test_make_prompts_rules_and_determinism():
    caption = "A red circle and two blue squares on a striped background."
    nouns = extract_nouns(caption)
    p1 = make_prompts(caption, 3, 7)
    assert p1 == make_prompts(caption, 3, random.Random(7))
    assert make_prompts(caption, 3, torch.Generator().manual_seed(3)) == make_prompts(
        caption, 3, torch.Generator().manual_seed(3)
    )
    used = []
    for prompt in p1:
        matches = [(t, n) for t in PROMPT_TEMPLATES for n in nouns if t.format(n) == prompt]
        assert matches, prompt
        used.append(matches[0][1])
    assert sorted(set(used)) == sorted(nouns)  # 3 nouns, 3 distinct ones used
    outputs = {tuple(make_prompts(caption, 3, seed)) for seed in range(20)}
    assert len(outputs) > 10
    # fewer nouns than k: the caption fills the remaining slots
    short = make_prompts("a circle", 3, 0, vocabulary=["circle"])
    assert short[1:] == ["a circle", "a circle"] and short[0] != "a circle" and "circle" in short[0]
    assert make_prompts("nothing here", 2, 0, nouns=[]) == ["nothing here"] * 2
    assert len(make_prompts(caption, 5, 0)) == 5


def test_make_prompts_bad_input():
    with pytest.raises(ValueError, match="k must"):
        make_prompts("a cat", 0)
    with pytest.raises(ValueError, match="placeholder"):
        make_prompts("a cat", 1, 0, templates=["no slot"])
    with pytest.raises(ValueError, match="templates"):
        make_prompts("a cat", 1, 0, templates=[])
    with pytest.raises(ValueError, match="rng"):
        make_prompts("a cat", 1, rng=1.5)  # type: ignore[arg-type]


def test_phrase_heads_name_the_noun_each_phrase_modifies():
    caption = "a red circle, a big blue Traffic Lights pole and a red circle."
    assert phrase_heads(caption, ["circle", "Traffic Light"]) == [
        ("red circle", "circle"), ("big blue traffic light", "Traffic Light")]
