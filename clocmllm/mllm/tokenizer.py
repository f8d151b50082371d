"""A small offline tokenizer for tiny models: word-level, one token per number 0–999.

Why word-level with whole numbers: a box is `[x1, y1, x2, y2]` on the 0–999 grid; with one
token per number a box costs 9 tokens (`[`, 4 numbers, 3 commas, `]`) and every coordinate is
a single prediction, so the grid itself is the vocabulary (Ferret/Shikra-style models spend
1–3 tokens per number with their BPEs). Digit-level would cost up to 21 tokens a box and make
the LM learn place value; measured in `tokens_per_box`, reported in docs/mllm.md.

Words are lower-cased (the synthetic world's text is small and regular). `<image>` and
`<region>` are special tokens; `<image>` is expanded to the tower's token count by the data
and model code, never by the tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

from clocmllm.boxes import GRID

IMAGE_TOKEN = "<image>"
REGION_TOKEN = "<region>"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN, REGION_TOKEN]

# Template words, so the v1 / plain prompts never hit <unk>.
TEMPLATE_TEXT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: ASSISTANT: user assistant system What is the object at Where is ? . , : ' [ ] ( )"
)


def word_splitter():
    """(normalizer, pre-tokenizer) shared by our tokenizers: lower-case; `<image>`/`<region>`,
    runs of digits, words and single punctuation marks each become one piece."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"<image>|<region>"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"\d+|[A-Za-z_']+|[^\sA-Za-z\d_']"), behavior="isolated"),
            pre_tokenizers.Whitespace(),
        ]
    )
    return normalizers.Lowercase(), pre


def corpus_pieces(texts: Iterable[str]) -> list[str]:
    """The pieces of the template text and `texts`, as `word_splitter` cuts them."""
    norm, pre = word_splitter()
    return [w for text in [TEMPLATE_TEXT, *texts] for w, _ in pre.pre_tokenize_str(norm.normalize_str(text))]


def as_fast_tokenizer(tok):
    """Wrap a `tokenizers.Tokenizer` over SPECIAL_TOKENS as a `PreTrainedTokenizerFast`."""
    from transformers import PreTrainedTokenizerFast

    tok.normalizer, tok.pre_tokenizer = word_splitter()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=[IMAGE_TOKEN, REGION_TOKEN],
    )


def build_tokenizer(texts: Iterable[str], min_count: int = 1):
    """Word-level `PreTrainedTokenizerFast` over `texts` plus the template and 0..999."""
    from collections import Counter

    from tokenizers import Tokenizer, models

    counts = Counter(corpus_pieces(texts))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for n in range(GRID):
        vocab.setdefault(str(n), len(vocab))
    for word in sorted(w for w, c in counts.items() if c >= min_count):
        vocab.setdefault(word, len(vocab))
    return as_fast_tokenizer(Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>")))


def ensure_special_tokens(tokenizer) -> bool:
    """Add `<image>`/`<region>` (and a pad token) to a pretrained tokenizer; True if it grew."""
    before = len(tokenizer)
    missing = [
        t
        for t in (IMAGE_TOKEN, REGION_TOKEN)
        if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)
    ]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return len(tokenizer) != before


def ensure_candidate_tokens(tokenizer, k: int) -> list[int]:
    """Add proposal grounding's `<r0>..<rK-1>` (special: one token each, whatever the
    pre-tokenizer) where missing; returns their ids in order."""
    from clocmllm.mllm.proposer import candidate_tokens

    names = candidate_tokens(k)
    missing = [t for t in names if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return [tokenizer.convert_tokens_to_ids(t) for t in names]


def tokens_per_box(tokenizer, box_text: str = "[123, 456, 789, 999]") -> int:
    return len(tokenizer(box_text, add_special_tokens=False)["input_ids"])
