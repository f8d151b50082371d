"""Caption augmentation for clip-rocket: stop-word removal and EDA (Wei & Zou, 2019).

clip-rocket pairs each strong image view with an augmented caption. The ops:
- `stopwords`: drop every stop word (the caption keeps its content words);
- `synonym`: replace up to n non-stop words that have a synonym by a random synonym;
- `swap`: swap two random words, n times;
- `delete`: drop each word with probability `alpha` (at least one word survives).
n = max(1, round(alpha * words)), EDA's rule, alpha = 0.1 by default.

Choices (ours): one op per augmented caption, drawn uniformly from `ops` (EDA applies
all four to make several sentences; clip-rocket needs one caption per view). Synonyms
come from a bundled table (`encoder/data/synonyms.json`, covering the synthetic world's
words and common caption words) so results are the same on every machine; WordNet (nltk)
is added on top only when its data is already installed — it is never downloaded, and
`use_wordnet=False` keeps runs identical across machines. Words are whitespace tokens,
lower-cased for look-up; punctuation stays attached to its word, as in EDA's cleaner.

numpy only (nltk optional, imported lazily); no jax, no torch.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np

OPS = ("stopwords", "synonym", "swap", "delete")

# EDA's stop-word list (a subset of NLTK's English list; no download needed).
STOP_WORDS = frozenset(
    """a an the and or but if while of at by for with about against between into through
    during before after to from in out on off over under again further then once here there
    when where why how all any both each few more most other some such no nor not only own
    same so than too very s t can will just don should now i me my myself we our ours
    ourselves you your yours yourself yourselves he him his himself she her hers herself it
    its itself they them their theirs themselves what which who whom this that these those
    am is are was were be been being have has had having do does did doing""".split()
)


@functools.lru_cache(maxsize=1)
def bundled_synonyms() -> dict[str, tuple[str, ...]]:
    """The packaged synonym table, word -> replacements (keys starting with '_' are notes)."""
    text = (resources.files("clocmllm.encoder") / "data" / "synonyms.json").read_text(encoding="utf-8")
    table = json.loads(text)
    return {k: tuple(v) for k, v in table.items() if not k.startswith("_")}


@functools.lru_cache(maxsize=1)
def _wordnet():
    """nltk's WordNet reader if its data is installed locally, else None (never downloads)."""
    try:
        import nltk
        from nltk.corpus import wordnet

        nltk.data.find("corpora/wordnet")
        wordnet.ensure_loaded()
        return wordnet
    except (ImportError, LookupError, OSError):
        return None


def synonyms(word: str, use_wordnet: bool = True) -> list[str]:
    """Replacements for `word` (lower-cased), bundled table first, then WordNet lemmas."""
    key = word.lower()
    out = list(bundled_synonyms().get(key, ()))
    wn = _wordnet() if use_wordnet else None
    if wn is not None:
        for syn in wn.synsets(key):
            for lemma in syn.lemma_names():
                cand = lemma.replace("_", " ").lower()
                if cand != key and cand not in out:
                    out.append(cand)
    return [s for s in out if s != key]


def _strip(word: str) -> str:
    return word.strip(".,;:!?\"'()").lower()


def remove_stopwords(words: Sequence[str]) -> list[str]:
    kept = [w for w in words if _strip(w) not in STOP_WORDS]
    return kept or list(words)


def synonym_replace(
    words: Sequence[str], n: int, rng: np.random.Generator, use_wordnet: bool = True
) -> list[str]:
    """Replace up to n distinct non-stop words that have synonyms (EDA's SR)."""
    out = list(words)
    candidates = [
        i for i, w in enumerate(out) if _strip(w) not in STOP_WORDS and synonyms(_strip(w), use_wordnet)
    ]
    for i in rng.permutation(len(candidates))[:n]:
        idx = candidates[int(i)]
        word = out[idx]
        core = _strip(word)
        options = synonyms(core, use_wordnet)
        choice = options[int(rng.integers(len(options)))]
        start = word.lower().find(core)
        out[idx] = word[:start] + choice + word[start + len(core) :]
    return out


def random_swap(words: Sequence[str], n: int, rng: np.random.Generator) -> list[str]:
    """Swap two random positions, n times (EDA's RS)."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.choice(len(out), size=2, replace=False)
        out[i], out[j] = out[j], out[i]
    return out


def random_delete(words: Sequence[str], p: float, rng: np.random.Generator) -> list[str]:
    """Drop each word with probability p; one random word survives if all would go (EDA's RD)."""
    if len(words) <= 1:
        return list(words)
    keep = rng.random(len(words)) >= p
    if not keep.any():
        keep[int(rng.integers(len(words)))] = True
    return [w for w, k in zip(words, keep, strict=True) if k]


@dataclass(frozen=True)
class CaptionAugment:
    """One augmented caption per call: one op from `ops`, drawn uniformly."""

    alpha: float = 0.1
    ops: tuple[str, ...] = OPS
    use_wordnet: bool = True

    def __post_init__(self) -> None:
        bad = [op for op in self.ops if op not in OPS]
        if bad or not self.ops:
            raise ValueError(f"caption ops must be a non-empty subset of {OPS}, got {self.ops}")

    def apply(self, text: str, op: str, rng: np.random.Generator) -> str:
        words = text.split()
        if not words:
            return text
        n = max(1, round(self.alpha * len(words)))
        if op == "stopwords":
            out = remove_stopwords(words)
        elif op == "synonym":
            out = synonym_replace(words, n, rng, self.use_wordnet)
        elif op == "swap":
            out = random_swap(words, n, rng)
        elif op == "delete":
            out = random_delete(words, self.alpha, rng)
        else:
            raise ValueError(f"unknown caption op {op!r}; known: {OPS}")
        return " ".join(out)

    def __call__(self, text: str, rng: np.random.Generator) -> str:
        op = self.ops[int(rng.integers(len(self.ops)))]
        return self.apply(text, op, rng)
