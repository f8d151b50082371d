"""Encoder tokenizer: CLIP-style framing over local tokenizer.json files, no downloads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors

from clocmllm.encoder.config import load_model_config
from clocmllm.encoder.tokenizer import (
    Tokenizer,
    TokenizerError,
    build_word_tokenizer,
    tokenizer_overrides,
)

CAPTIONS = [
    "A red cube left of a blue sphere.",
    "the blue sphere above a green cylinder",
    "Two red cubes",
]


@pytest.fixture()
def word_tok(tmp_path):
    return build_word_tokenizer(CAPTIONS, tmp_path / "tok" / "tokenizer.json", context_length=8)


def test_word_tokenizer_round_trip_and_file(word_tok, tmp_path):
    path = tmp_path / "tok" / "tokenizer.json"
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    assert [vocab[t] for t in ("<pad>", "<unk>", "<sot>", "<eot>")] == [0, 1, 2, 3]
    assert (word_tok.pad_token_id, word_tok.sot_token_id, word_tok.eot_token_id) == (0, 2, 3)
    # every word seen is in the vocabulary; "a" (3x) and "blue" (2x) come first
    words = {"a", "red", "cube", "left", "of", "blue", "sphere", ".", "the", "above"}
    assert words <= set(vocab)
    assert vocab["a"] == 4
    assert word_tok.vocab_size == len(vocab)
    ids = word_tok.encode_batch(["A Red cube", "blue SPHERE"])
    assert ids.dtype == np.int32 and ids.shape == (2, 8)
    assert word_tok.decode(ids[0]) == "a red cube"
    assert word_tok.decode(ids[1]) == "blue sphere"
    row = ids[0].tolist()
    assert row[:5] == [2, vocab["a"], vocab["red"], vocab["cube"], 3] and row[5:] == [0, 0, 0]
    # reloading the file gives the same ids; unknown words map to <unk>
    again = Tokenizer.from_file(path, context_length=8)
    np.testing.assert_array_equal(again.encode_batch(["A Red cube", "blue SPHERE"]), ids)
    assert again.encode("a zebra").tolist()[:4] == [2, vocab["a"], 1, 3]


def test_truncation_keeps_eot(word_tok):
    long = " ".join(["red"] * 20)
    row = word_tok.encode(long)
    assert row.shape == (8,)
    assert row[0] == word_tok.sot_token_id and row[-1] == word_tok.eot_token_id
    assert (row == word_tok.eot_token_id).sum() == 1
    exact = word_tok.encode(" ".join(["red"] * 6))  # 6 words + sot + eot fill the row exactly
    assert exact[-1] == word_tok.eot_token_id and (exact != word_tok.pad_token_id).all()
    empty = word_tok.encode("")
    assert empty[:2].tolist() == [2, 3] and (empty[2:] == 0).all()
    with pytest.raises(TypeError):
        word_tok.encode_batch("not a list")


def test_clip_style_bpe_file_ignores_its_post_processor(tmp_path):
    """A CLIP-like file (special tokens <|startoftext|>/<|endoftext|>, own template) frames alike."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "h": 2, "i": 3, "hi": 4, "y": 5, "o": 6}
    bpe = HFTokenizer(models.BPE(vocab=vocab, merges=[("h", "i")], unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    bpe.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|> <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)],
    )
    path = tmp_path / "clip.json"
    bpe.save(str(path))
    tok = Tokenizer.from_file(path, context_length=6)
    assert (tok.sot_token_id, tok.eot_token_id, tok.pad_token_id) == (0, 1, 0)
    assert tok.encode("HI yo").tolist() == [0, 4, 5, 6, 1, 0]  # lower-cased, one EOT, pad 0


def test_overrides_feed_the_model_config(word_tok):
    cfg = load_model_config("tiny", tokenizer_overrides(word_tok))
    assert cfg.vocab_size == word_tok.vocab_size and cfg.eot_token_id == word_tok.eot_token_id
    assert cfg.context_length == 8


def test_errors_name_the_file(tmp_path):
    with pytest.raises(TokenizerError, match="missing.json"):
        Tokenizer.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json"):
        Tokenizer.from_file(bad)
    noeot = tmp_path / "noeot.json"
    HFTokenizer(models.WordLevel(vocab={"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(noeot))
    with pytest.raises(TokenizerError, match="noeot.json.*end-of-text"):
        Tokenizer.from_file(noeot)
