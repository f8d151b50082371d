"""Text tokenizer for the encoder: any local HF `tokenizers` tokenizer.json, CLIP-style framing.

Framing is ours, not the file's: text is lower-cased, encoded WITHOUT the file's own
post-processor, then framed as [sot] + tokens + [eot] and padded to `context_length`.
Truncation drops text tokens, never the EOT, because the text tower pools at the first
EOT. Doing the framing here means a CLIP BPE file, a converted SentencePiece file and our
word-level file all behave the same. No downloads: the file must exist locally.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

PAD, UNK, SOT, EOT = "<pad>", "<unk>", "<sot>", "<eot>"
# First match wins: our word-level names, OpenAI CLIP BPE, SentencePiece conventions.
SOT_NAMES = (SOT, "<|startoftext|>", "<s>", "[CLS]")
EOT_NAMES = (EOT, "<|endoftext|>", "</s>", "[SEP]")
PAD_NAMES = (PAD, "[PAD]")


class TokenizerError(ValueError):
    """A tokenizer file that cannot frame CLIP-style sequences."""


class Tokenizer:
    """CLIP-style framing over a HF tokenizer. `encode_batch(texts) -> int32 [B, context_length]`."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        context_length: int = 77,
        eot_token_id: int | None = None,
        sot_token_id: int | None = None,
        pad_token_id: int | None = None,
        source: str = "<tokenizer>",
    ) -> None:
        self._tok = tokenizer
        self.source = source
        self.context_length = int(context_length)
        self.eot_token_id = _pick(tokenizer, eot_token_id, EOT_NAMES)
        if self.eot_token_id is None:
            raise TokenizerError(f"{source}: no end-of-text token among {EOT_NAMES}")
        self.sot_token_id = _pick(tokenizer, sot_token_id, SOT_NAMES)
        pad = _pick(tokenizer, pad_token_id, PAD_NAMES)
        # OpenAI CLIP pads with id 0 (it never reads past the first EOT): same default here.
        self.pad_token_id = 0 if pad is None else pad
        framing = 1 + int(self.sot_token_id is not None)
        if self.context_length <= framing:
            raise TokenizerError(f"{source}: context_length {context_length} too short")

    @classmethod
    def from_file(cls, path: str | os.PathLike, context_length: int = 77, **ids: int) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer file not found")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{path}: not a tokenizers JSON file ({err})") from None
        return cls(tok, context_length, source=str(path), **ids)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> int32 [len(texts), context_length]: [sot] tokens [eot] pad..."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings, not a string")
        encodings = self._tok.encode_batch([t.lower() for t in texts], add_special_tokens=False)
        out = np.full((len(texts), self.context_length), self.pad_token_id, dtype=np.int32)
        head = [] if self.sot_token_id is None else [self.sot_token_id]
        room = self.context_length - len(head) - 1
        for row, enc in enumerate(encodings):
            ids = head + enc.ids[:room] + [self.eot_token_id]
            out[row, : len(ids)] = ids
        return out

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids (one row) -> text, stopping at the first EOT, dropping SOT/pad."""
        keep = []
        for i in (int(x) for x in ids):
            if i == self.eot_token_id:
                break
            if i not in (self.sot_token_id, self.pad_token_id):
                keep.append(i)
        return self._tok.decode(keep, skip_special_tokens=False)

    def overrides(self) -> dict[str, int]:
        """ModelConfig fields that must match this tokenizer (pass to load_model_config)."""
        return tokenizer_overrides(self)


def tokenizer_overrides(tok: Tokenizer) -> dict[str, int]:
    """{'vocab_size', 'eot_token_id', 'pad_token_id', 'context_length'} of `tok`."""
    return {
        "vocab_size": tok.vocab_size,
        "eot_token_id": tok.eot_token_id,
        "pad_token_id": tok.pad_token_id,
        "context_length": tok.context_length,
    }


def _pick(tok: HFTokenizer, explicit: int | None, names: Sequence[str]) -> int | None:
    if explicit is not None:
        return int(explicit)
    for name in names:
        idx = tok.token_to_id(name)
        if idx is not None:
            return idx
    return None


_WORD = re.compile(r"\w+|[^\w\s]+")


def build_word_tokenizer(
    texts: Iterable[str], path: str | os.PathLike, context_length: int = 77, min_count: int = 1
) -> Tokenizer:
    """Word-level tokenizer over the words of `texts` (captions, or a vocabulary list), saved
    atomically as tokenizer.json at `path`. Ids: <pad>=0, <unk>=1, <sot>=2, <eot>=3, then
    words by decreasing count (ties alphabetical, so the file is deterministic).

    Words are lower-cased and split like the tokenizer's pre-tokenizer (`\\w+|[^\\w\\s]+`),
    so every word seen here encodes to one id.
    """
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(_WORD.findall(text.lower()))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    specials = [PAD, UNK, SOT, EOT]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    hf = HFTokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    hf.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(specials)
    hf.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        hf.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return Tokenizer(hf, context_length, source=str(path))
