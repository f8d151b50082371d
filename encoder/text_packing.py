"""Captions and region phrases packed into few token rows for the text tower (host side, numpy).

Why: the CLOC step runs the text tower over every region phrase of a batch (B * M of them,
or the distinct ones after `dedup_region_text`), and both steps over the captions. Both are
of mixed length, and an array of them is as wide as the longest: at ViT-S/16 with random
2-6 word phrases, a quarter of the phrase pass was padding; the synthetic world's captions
(9-30 words) fill a third less than their 32-token rows. Packing lays the sequences end to
end into rows of `pack_width` tokens, as sequence packing does for language-model
pre-training. The text tower (`TextTower.encode_packed`) then lets a token attend only to
the earlier tokens of its own sequence (segment ids), reads each token's position embedding
at its position within the sequence, and pools each at its own first EOT: every embedding is
the one the unpacked pass gives (to rounding; tested), and the tower computes real tokens.

The shared first token. When every sequence that is read starts with the same token (the
tokenizer's SOT), the hidden state at position 0 is the same for all of them in every
layer: in a causal tower position 0 attends to itself only. That row is then computed once
(`*_sot`, the token id repeated per row so that it shards like the rows) and every sequence
attends to it as a shared first key; the rows hold the tokens after it. With 4-8 token
phrases, this is another 1/6 of the tokens.

Layout (keys of the batch, replacing `region_text` / `region_phrases`; for captions `text`
is replaced by the same keys under `text_pack_`, the pool index in caption order):
- `region_pack_tokens`, `region_pack_positions`, `region_pack_segments` [R, W] int32: token
  ids, their positions within their phrase, and a per-row segment number (1, 2, ... for the
  phrases of a row; 0 for the padding at the end of a row, which nobody reads);
- `region_pack_pool` [U] int32: the flat index r * W + c of each phrase's pooled token (its
  first EOT, else its last), 0 for phrases no valid slot reads;
- `region_phrase_index` [b, M] int32: the phrase of each region slot (as `dedup_region_text`
  gives it, or the slot's own row when the batch was not de-duplicated);
- `region_pack_sot` [R] int32, only with the shared first token.
The trainer packs on a single process only (every host would have to pick the same shapes),
with `data.pack_phrases` and `data.pack_captions` (`recipe: cloc`).
"""

from __future__ import annotations

import numpy as np

from clocmllm.encoder.input_pipeline import PHRASE_BUCKETS, phrase_count_bucket, pooled_positions

# Tokens a packed row holds at least (`pack_width`: wider for longer sequences). 16 fits 2-5
# noun phrases a row; each token attends over W + 1 keys, ~1.5% of its FLOPs at width 384.
PACK_WIDTH = 16


# Text width from which `auto` packs (trainer `data.pack_phrases` / `data.pack_captions`).
# Measured: at ViT-S/16 sizes (width 384) packed phrases made the CLOC step 3% shorter (one
# thread); at `tiny` (width 64) its many small ops made the trainer's step 9% longer (2
# threads), though the packed tokens are fewer: at small widths the per-op cost dominates.
PACK_MIN_WIDTH = 256


def wants_packing(setting: bool | str, text_width: int, key: str = "data.pack_*") -> bool:
    """A `data.pack_*` setting (true, false or 'auto') for a text tower of `text_width`;
    ValueError naming `key` for any other value (the trainer's config check calls this)."""
    if setting == "auto":
        return text_width >= PACK_MIN_WIDTH
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"{key}: {setting!r} must be true, false or 'auto'")


def fill_rows(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Items of `lengths` (each 1..width) laid into rows of `width`: row, start column and
    segment number (1, 2, ... within its row) of each item, and the row count.

    Each row takes the longest item left, then the subset of the items left that fills the
    rest of the row best, longest items first (a bounded subset sum over the <= width
    distinct lengths, bit sets as Python ints). Why not best-fit decreasing: with 3-7 token
    phrases in rows of 16 it left a gap in most rows (42 rows where 39 hold the tokens); this fills rows exactly
    whenever the lengths left allow it. Cost: O(rows * width) small integer operations.
    """
    by_len: list[list[int]] = [[] for _ in range(width + 1)]
    for i in np.argsort(lengths, kind="stable"):
        by_len[int(lengths[i])].append(int(i))
    rows, cols, segments = (np.zeros(len(lengths), np.int64) for _ in range(3))
    count = 0
    while True:
        top = next((n for n in range(width, 0, -1) if by_len[n]), 0)
        if not top:
            return rows, cols, segments, count
        picked = [by_len[top].pop()]
        room = width - top
        # reach[j]: the sums (bits) reachable with the lengths room..sizes[j-1] left; the walk
        # back takes a shorter length only where the longer ones cannot make the sum, so
        # short phrases stay for the gaps of later rows
        sizes = range(room, 0, -1)
        reach = [1]
        for n in sizes:
            r = reach[-1]
            for _ in range(min(len(by_len[n]), room // n)):
                r |= r << n
            reach.append(r & ((1 << (room + 1)) - 1))
        total = reach[-1].bit_length() - 1
        for j in range(len(sizes) - 1, -1, -1):
            n = sizes[j]
            while total and not (reach[j] >> total) & 1:
                picked.append(by_len[n].pop())
                total -= n
        col = 0
        for seg, i in enumerate(picked, 1):
            rows[i], cols[i], segments[i] = count, col, seg
            col += int(lengths[i])
        count += 1


def pack_width(length: int, width: int = PACK_WIDTH) -> int:
    """Row width for sequences of up to `length` tokens: the smallest `PHRASE_BUCKETS` length
    >= 1.5 x length (so that a long sequence leaves room for a short one), at least `width`."""
    want = -(-3 * length // 2)
    return max(width, next((b for b in PHRASE_BUCKETS if b >= want), want))


def pack_rows(
    seqs: np.ndarray,
    read: np.ndarray,
    eot_token_id: int,
    width: int,
    align: int = 1,
    min_rows: int = 0,
) -> dict[str, np.ndarray]:
    """Sequences [N, T] laid into rows of `width` (>= T) tokens: `tokens`, `positions`,
    `segments` [R, W], `pool` [N] and, with a shared first token, `sot` [R] (module doc).
    Rows `read` False are not packed (their pool index is 0). The row count is bucketed
    (`phrase_count_bucket`: steps of 1/32 of N, at least 4 rows, a multiple of `align`, at
    least `min_rows`) so that a run's step sees few shapes."""
    n, t = seqs.shape
    pool = pooled_positions(seqs, eot_token_id)
    first = seqs[read, 0]
    # a shared first token: the same id at position 0 of every read row, none pooled there
    shared = bool(read.any()) and bool((first == first[0]).all()) and bool((pool[read] >= 1).all())
    start = 1 if shared else 0
    lengths = np.where(read, pool + 1 - start, 0)
    items = np.flatnonzero(read)
    row, col, seg, count = fill_rows(lengths[items], width)
    rows = phrase_count_bucket(max(count, 1), max(n, 1), align, steps=32, min_grain=4, floor=min_rows)
    out = {k: np.zeros((rows, width), np.int32) for k in ("tokens", "positions", "segments")}
    out["pool"] = np.zeros(n, np.int32)
    # every packed token at once: its source (sequence, column) and its place (flat r * W + c)
    lens = lengths[items]
    first_slot = row * width + col
    offset = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    dst = np.repeat(first_slot, lens) + offset
    out["tokens"].flat[dst] = seqs[np.repeat(items, lens), start + offset]
    out["positions"].flat[dst] = start + offset
    out["segments"].flat[dst] = np.repeat(seg, lens)
    out["pool"][items] = first_slot + lens - 1
    if shared:
        out["sot"] = np.full(rows, first[0], np.int32)
    return out


def pack_region_phrases(
    batch: dict[str, np.ndarray],
    eot_token_id: int,
    align: int = 1,
    min_rows: int = 0,
    width: int = PACK_WIDTH,
) -> dict[str, np.ndarray]:
    """The batch with its region phrases (`region_text` [b, M, T], or `region_phrases` [U, T]
    with `region_phrase_index` after `dedup_region_text`) packed into rows of `pack_width(T,
    width)` tokens (module doc; `pack_rows`). Phrases that no valid slot reads (invalid
    slots, the de-duplication's padding rows) are not packed."""
    if "region_text" not in batch and "region_phrases" not in batch:
        return batch
    valid = np.asarray(batch["region_valid"], bool)
    if "region_phrases" in batch:
        phrases, index = batch["region_phrases"], np.asarray(batch["region_phrase_index"], np.int32)
    else:
        b, m, t = batch["region_text"].shape
        phrases = batch["region_text"].reshape(b * m, t)
        index = np.arange(b * m, dtype=np.int32).reshape(b, m)
    read = np.zeros(len(phrases), bool)
    read[index[valid]] = True
    packed = pack_rows(phrases, read, eot_token_id, pack_width(phrases.shape[1], width), align, min_rows)
    out = {k: v for k, v in batch.items() if k not in ("region_text", "region_phrases")}
    out.update({f"region_pack_{k}": v for k, v in packed.items()}, region_phrase_index=index)
    return out


def pack_captions(
    batch: dict[str, np.ndarray],
    eot_token_id: int,
    align: int = 1,
    min_rows: int = 0,
    width: int = PACK_WIDTH,
) -> dict[str, np.ndarray]:
    """The batch with its captions `text` [B, T] packed into rows (`text_pack_*`, the pool
    index in caption order; `pack_rows`). Captions vary in length more than phrases (the
    synthetic world's: 9-30 words, a batch cut to 32 tokens), so a row holds one long and
    one short caption, or two mid-length ones: about 0.7x the tokens on the world's data."""
    tokens = batch["text"]
    packed = pack_rows(
        tokens, np.ones(len(tokens), bool), eot_token_id, pack_width(tokens.shape[1], width), align, min_rows
    )
    out = {k: v for k, v in batch.items() if k != "text"}
    out.update({f"text_pack_{k}": v for k, v in packed.items()})
    return out


class Packer:
    """`pack_region_phrases` or `pack_captions` across a run's batches: the row count and
    width only grow (each batch's floor is the largest so far), so the step compiles for one
    or two shapes. Captions are packed only once packing saves at least `min_saving` of
    their tokens (then always: the step's shape does not flip back), since captions of one
    length (a benchmark's) gain nothing from it."""

    def __init__(self, what: str, eot_token_id: int, align: int = 1, min_saving: float = 0.1):
        if what not in ("phrases", "captions"):
            raise ValueError(f"Packer: what must be 'phrases' or 'captions', got {what!r}")
        self.what, self.eot_token_id, self.align, self.min_saving = what, eot_token_id, align, min_saving
        self.rows, self.width, self.on = 0, PACK_WIDTH, what == "phrases"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.what == "phrases":
            out = pack_region_phrases(batch, self.eot_token_id, self.align, self.rows, self.width)
            key = "region_pack_tokens"
        else:
            out = pack_captions(batch, self.eot_token_id, self.align, self.rows, self.width)
            key = "text_pack_tokens"
            if not self.on:  # packed only once it pays; the shape floors start from then
                if out[key].size > (1 - self.min_saving) * batch["text"].size:
                    return batch
                self.on = True
        if key in out:
            self.rows, self.width = out[key].shape
        return out
