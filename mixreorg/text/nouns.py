"""Noun extraction from captions, offline.

GroupViT tags captions with nltk's perceptron tagger (data downloaded at run time). Here the data
cannot be downloaded, so :func:`extract_nouns` picks one of three methods:

* ``"vocabulary"`` -- when a vocabulary of known nouns is given (single or multi-word, e.g. the
  class names of a synthetic dataset): the vocabulary entries found in the caption, longest match
  first, simple plurals accepted (``circles`` -> ``circle``), returned in vocabulary spelling.
* ``"nltk"`` -- when nltk and its ``averaged_perceptron_tagger(_eng)`` data are installed: words
  tagged NN, NNS, NNP or NNPS (GroupViT also keeps verbs; we keep nouns only).
* ``"heuristic"`` -- the documented fallback: the caption is cut into runs of content words at
  stop words (determiners, pronouns, prepositions, conjunctions, auxiliaries, common caption verbs,
  numbers) and punctuation; the head noun of a run is its last word that is not a known adjective
  (colours, sizes, textures...) or an ``-ly`` adverb; an ``-ing`` word right after a content word
  ends the run (``dogs playing`` -> ``dogs``) and is dropped when nothing follows it.
  English only, and wrong at times (``a cat sleeps`` keeps ``sleeps`` unless it is in the verb
  list); good enough for prompt augmentation, which is its only use.

``"auto"`` = vocabulary if given, else nltk if usable, else the heuristic. Results are lower case,
de-duplicated, in order of first appearance.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

__all__ = ["extract_nouns", "noun_phrases", "phrase_heads", "nltk_available", "STOP_WORDS", "ADJECTIVES"]

_WORD_OR_PUNCT = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*|[^\sa-z0-9]")

STOP_WORDS: frozenset[str] = frozenset(
    """
    a an the this that these those some any many much several few each every either neither both
    all no not none nothing something anything everything another other such
    what which who whom whose whichever whatever
    one two three four five six seven eight nine ten eleven twelve dozen hundred thousand
    first second third last next
    i me my mine myself you your yours yourself he him his himself she her hers herself it its itself
    we us our ours ourselves they them their theirs themselves there here
    of in on at by for with without within from to into onto upon over under above below behind
    beside besides between among around about across along against near inside outside through
    throughout toward towards off out up down before after during until till via per than like
    and or but nor so yet if then else while whereas because though although as
    is are was were be been being am do does did done doing have has had having will would shall
    should can could may might must
    very too also just only still even again ever never always often sometimes really quite rather
    more most less least well
    sits sit sat stands stand stood lies lie lay looks look holds hold held shows show shown
    appears appear seems seem contains contain includes include features feature
    get gets got make makes made take takes took see seen sees go goes went
    s t d ll m re ve
    """.split()
)

ADJECTIVES: frozenset[str] = frozenset(
    """
    red green blue yellow orange purple pink brown black white gray grey golden silver cyan magenta
    violet beige dark bright pale colorful colourful
    big small large little tiny huge giant tall short long wide narrow thick thin high low
    round flat empty full open closed
    old new young modern ancient
    striped dotted spotted checkered plain textured patterned wooden metallic
    good bad nice beautiful pretty cute ugly great fine
    """.split()
)


@functools.lru_cache(maxsize=1)
def nltk_available() -> bool:
    """True when nltk is installed and its POS tagger data can be loaded (nothing is downloaded)."""
    try:
        import nltk  # type: ignore[import-not-found]
    except ImportError:
        return False
    try:
        nltk.pos_tag(["a", "cat"])
    except LookupError:
        return False
    except Exception:  # noqa: BLE001 - any failure of the optional path means "not usable"
        return False
    return True


def _words(caption: str) -> list[str]:
    return _WORD_OR_PUNCT.findall(caption.lower())


def _unique(words: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)


def _singulars(word: str) -> list[str]:
    forms = [word]
    if word.endswith("ies") and len(word) > 4:
        forms.append(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        forms.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        forms.append(word[:-1])
    return forms


def _by_vocabulary(caption: str, vocabulary: Iterable[str]) -> list[str]:
    entries: dict[tuple[str, ...], str] = {}
    for entry in vocabulary:
        if not isinstance(entry, str) or not entry.strip():
            raise ValueError(f"vocabulary entries must be non-empty strings, got {entry!r}")
        key = tuple(_words(entry))
        entries.setdefault(key, entry.strip().lower())
    if not entries:
        return []
    max_len = max(len(k) for k in entries)
    words = [w for w in _words(caption) if w[0].isalnum()]
    found = []
    i = 0
    while i < len(words):
        for n in range(min(max_len, len(words) - i), 0, -1):
            head = tuple(words[i : i + n - 1])
            match = next(
                (entries[head + (s,)] for s in _singulars(words[i + n - 1]) if head + (s,) in entries),
                None,
            )
            if match is not None:
                found.append(match)
                i += n
                break
        else:
            i += 1
    return _unique(found)


def _by_nltk(caption: str) -> list[str]:
    import nltk  # type: ignore[import-not-found]

    tokens = [w for w in _words(caption) if w[0].isalnum()]
    return _unique(w for w, tag in nltk.pos_tag(tokens) if tag in ("NN", "NNS", "NNP", "NNPS"))


def _is_content(word: str) -> bool:
    return word[0].isalpha() and word not in STOP_WORDS and not word.isdigit()


def _head(run: list[str]) -> str | None:
    for word in reversed(run):
        if word in ADJECTIVES or (word.endswith("ly") and len(word) > 4):
            continue
        return word
    return None


def _by_heuristic(caption: str) -> list[str]:
    runs: list[list[str]] = []
    current: list[str] = []
    for word in _words(caption):
        if not _is_content(word):
            if current:
                runs.append(current)
            current = []
            continue
        if word.endswith("ing") and len(word) > 5 and current:
            runs.append(current)  # "dogs playing": the run before the participle ends here
            current = ["\0" + word]  # marked: dropped if nothing follows it
            continue
        current.append(word)
    if current:
        runs.append(current)
    nouns = []
    for run in runs:
        if run[0].startswith("\0"):
            if len(run) == 1:
                continue
            run = run[1:]
        head = _head(run)
        if head is not None:
            nouns.append(head)
    return _unique(nouns)


def extract_nouns(caption: str, vocabulary: Iterable[str] | None = None, *, method: str = "auto") -> list[str]:
    """Nouns of ``caption`` (lower case, unique, in order of appearance).

    Args:
        caption: an English caption.
        vocabulary: known nouns (e.g. class names); when given, only these are returned.
        method: ``"auto"``, ``"vocabulary"``, ``"nltk"`` or ``"heuristic"`` (see the module doc).

    >>> extract_nouns("A red circle and two blue squares on a striped background.")
    ['circle', 'squares', 'background']
    >>> extract_nouns("two circles and a triangle", vocabulary=["circle", "square", "triangle"])
    ['circle', 'triangle']
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a str, got {type(caption).__name__}")
    if method not in ("auto", "vocabulary", "nltk", "heuristic"):
        raise ValueError(f"method must be 'auto', 'vocabulary', 'nltk' or 'heuristic', got {method!r}")
    if method == "auto":
        method = "vocabulary" if vocabulary is not None else ("nltk" if nltk_available() else "heuristic")
    if method == "vocabulary":
        if vocabulary is None:
            raise ValueError("method='vocabulary' needs a vocabulary")
        if isinstance(vocabulary, str):
            raise ValueError("vocabulary must be an iterable of words, not one str")
        return _by_vocabulary(caption, vocabulary)
    if method == "nltk":
        if not nltk_available():
            raise ValueError(
                "method='nltk' needs nltk and its averaged_perceptron_tagger data installed "
                "(they cannot be downloaded here); use method='heuristic' or a vocabulary"
            )
        return _by_nltk(caption)
    return _by_heuristic(caption)


def noun_phrases(caption: str, nouns: Iterable[str]) -> list[str]:
    """The modified mentions of ``nouns`` in ``caption``: each occurrence of a noun (simple plurals
    accepted, returned in the noun's spelling) with the run of :data:`ADJECTIVES` right before it.

    Bare mentions (no modifier) are left out: they are the nouns themselves. Used for attribute
    prompts ("a photo of a red circle."): an attribute that is easy to see in a patch (a colour)
    tells WHERE a harder one (the shape) is, so a caption can localise its nouns.

    >>> noun_phrases("a red circle and a big blue square on grass.", ["circle", "square", "grass"])
    ['red circle', 'big blue square']
    >>> noun_phrases("there is a circle.", ["circle"])
    []
    """
    return _unique(phrase for phrase, _ in phrase_heads(caption, nouns))


def phrase_heads(caption: str, nouns: Iterable[str]) -> list[tuple[str, str]]:
    """:func:`noun_phrases` with the noun each phrase modifies: ``(phrase, noun)`` pairs, unique, in
    the caption's order, the noun spelled as given.

    >>> phrase_heads("a red circle and a red circle", ["circle"])
    [('red circle', 'circle')]
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a str, got {type(caption).__name__}")
    if isinstance(nouns, str):
        raise ValueError("nouns must be an iterable of words, not one str")
    wanted: dict[tuple[str, ...], str] = {}
    for noun in nouns:
        key = tuple(_words(noun)) if isinstance(noun, str) else ()
        if not key:
            raise ValueError(f"nouns must be non-empty strings, got {noun!r}")
        wanted.setdefault(key, noun)
    words = _words(caption)  # punctuation kept: a comma ends a run of modifiers
    phrases = []
    for i in range(len(words)):
        for key, noun in wanted.items():
            n = len(key)
            if i + n > len(words) or tuple(words[i : i + n - 1]) != key[:-1]:
                continue
            if key[-1] not in _singulars(words[i + n - 1]):
                continue
            start = i
            while start > 0 and words[start - 1] in ADJECTIVES:
                start -= 1
            if start < i:
                phrases.append((" ".join(words[start:i] + list(key)), noun))
    return list(dict.fromkeys(phrases))
