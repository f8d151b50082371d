"""The demo's digit-level tokenizer for the from-scratch MLLM (an option of `clocmllm demo`).

Why digits for the demo: `clocmllm.mllm.tokenizer` gives every grid number 0-999 its own
token, which is the right call for an LLM that already knows numbers. A tiny LLM trained from
scratch for two minutes sees each of those 1000 symbols only a few dozen times and has no way
to know that 417 is next to 418; with ten digit tokens (plus WordPiece `##` continuations, so
decoding glues them back into numbers the box parser reads), every coordinate is three
10-way choices, the leading one a coarse position, each seen thousands of times. A box costs
17 tokens instead of 9. The words are those of the training conversations, as in
`build_tokenizer`; numbers never become words.
"""

from __future__ import annotations

import json
from pathlib import Path

from clocmllm.mllm.tokenizer import SPECIAL_TOKENS, as_fast_tokenizer, corpus_pieces


def build_digit_tokenizer(texts: list[str]):
    """A `PreTrainedTokenizerFast`: lower-cased words, numbers as digits (`4 ##1 ##7`)."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for d in "0123456789":
        vocab.setdefault(d, len(vocab))
        vocab.setdefault("##" + d, len(vocab))
    for w in sorted({w for w in corpus_pieces(texts) if not w.isdigit()}):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", max_input_chars_per_word=100))
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return as_fast_tokenizer(tok)


def write_digit_tokenizer(conversations: str | Path, out: str | Path) -> Path:
    """Build from a LLaVA conversation JSON and save to `out` (a folder AutoTokenizer loads)."""
    conversations, out = Path(conversations), Path(out)
    texts = [m["value"] for rec in json.loads(conversations.read_text()) for m in rec["conversations"]]
    tmp = out.with_name(out.name + ".tmp")
    build_digit_tokenizer(texts).save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out
