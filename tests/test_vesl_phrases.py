"""VESL phrase extraction: the paper's NP grammar, filters, dedupe, cap, tagger fallback."""

from __future__ import annotations

import pytest

from clocmllm.vesl import phrases as ph
from clocmllm.vesl.phrases import PhraseExtractor


@pytest.fixture(scope="module")
def extractor() -> PhraseExtractor:
    return PhraseExtractor()


# (caption, expected phrases) with the installed tagger (NLTK's data when present, else spaCy's).
TABLE = [
    (
        "A small red circle and a large blue square on a gray background.",
        ["small red circle", "large blue square", "gray background"],
    ),
    ("A tabby cat lying on a red blanket and looking at the camera.", ["tabby cat", "red blanket", "camera"]),
    ("The image shows a woman holding an American flag.", ["woman", "american flag"]),
    ("A picture of the background.", []),
    ("Two dogs and a dog and the dogs.", ["dogs", "dog"]),
    ("", []),
]


@pytest.mark.parametrize(("caption", "expected"), TABLE)
def test_phrase_table(extractor: PhraseExtractor, caption: str, expected: list[str]) -> None:
    assert extractor(caption) == expected


def _tagger(tags: dict[str, str]):
    return lambda text: [(w, tags[w.lower()]) for w in text.split()]


def test_grammar_exactly_with_fixed_tags() -> None:
    # NP: {<DT>?<JJ.*>*<NN.*>+}: one optional determiner, adjectives, then one or more nouns.
    tags = {
        "the": "DT",
        "big": "JJ",
        "redder": "JJR",
        "fire": "NN",
        "trucks": "NNS",
        "near": "IN",
        "all": "DT",
        "this": "DT",
        "stone": "NN",
        "wall": "NN",
        "runs": "VBZ",
        "fast": "RB",
    }
    ex = PhraseExtractor(tagger=_tagger(tags), stop_words={"the", "all", "this", "near"}, generic_words=set())
    assert ex.tagger_name == "custom"
    assert ex("the big redder fire trucks near this stone wall") == ["big redder fire trucks", "stone wall"]
    # an adjective with no noun is no phrase; a lone determiner is no phrase
    assert ex("the big runs fast") == []


def test_generic_and_stop_word_filters_and_cap() -> None:
    words = ["image", "view", "blue", "background", "cat", "hat", "bat", "rat", "mat"]
    tags = {w: "NN" for w in words} | {"blue": "JJ", "a": "DT", "and": "CC"}
    ex = PhraseExtractor(tagger=_tagger(tags), max_phrases=3)
    # "image" and "view" are generic-only -> dropped; "blue background" keeps a non-generic word
    assert ex("a image and a view and a blue background and a cat") == ["blue background", "cat"]
    assert ex("a cat and a hat and a bat and a rat and a mat") == ["cat", "hat", "bat"]
    assert "background" in ph.GENERIC_WORDS and "image" in ph.GENERIC_WORDS


def test_no_tagger_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ph, "_nltk_tagger", lambda: None)
    monkeypatch.setattr(ph, "_spacy_tagger", lambda: None)
    with pytest.raises(RuntimeError, match="en-core-web-sm|averaged_perceptron_tagger"):
        PhraseExtractor()


def test_spacy_tagger_without_attribute_ruler_keeps_the_tags() -> None:
    """We load spaCy without its attribute ruler (2x faster); the Penn tags must be the full pipeline's."""
    spacy = pytest.importorskip("spacy")
    tagger = ph._spacy_tagger()
    if tagger is None:
        pytest.skip("no spaCy English model installed")
    name = next(n for n in ph.SPACY_MODELS if spacy.util.is_package(n))
    full = spacy.load(name)
    captions = [c for c, _ in TABLE] + [
        "A woman in a white space suit holds an American flag next to a tall rocket on a launch pad,\n"
        "with a cup of coffee, a silver spoon and a tabby cat on a red blanket.",
        "Two men's bikes (red and blue) lean against the old brick wall; it's 5 o'clock.",
    ]
    for caption in captions:
        assert tagger(caption) == [(t.text, t.tag_) for t in full(caption) if not t.is_space]
