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

from clocmllm.mllm.tokenizer import _TEMPLATE_TEXT, IMAGE_TOKEN, REGION_TOKEN, SPECIAL_TOKENS


def build_digit_tokenizer(texts: list[str]):
    """A `PreTrainedTokenizerFast`: lower-cased words, numbers as digits (`4 ##1 ##7`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"<image>|<region>"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"\d+|[A-Za-z_']+|[^\sA-Za-z\d_']"), behavior="isolated"),
            pre_tokenizers.Whitespace(),
        ]
    )
    norm = normalizers.Lowercase()
    words: set[str] = set()
    for text in [_TEMPLATE_TEXT, *texts]:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)) if not w.isdigit())
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for d in "0123456789":
        vocab.setdefault(d, len(vocab))
        vocab.setdefault("##" + d, len(vocab))
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", max_input_chars_per_word=100))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=[IMAGE_TOKEN, REGION_TOKEN],
    )


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
