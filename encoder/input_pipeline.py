"""Region-text batches for CLIP/CLOC pretraining: deterministic, resumable, prefetched.

Sources: a region JSONL file, a folder of `*.jsonl` shards (what the VESL labeller writes),
or a synthetic-world folder (its `<split>/regions.jsonl`). Records are read once into
memory (metadata only; images are decoded per batch).

Determinism and resumption: the batch at step `s` is a pure function of `(seed, s)`.
Global sample position `p = s * batch + i` lives in epoch `p // n` at slot `p % n` of that
epoch's permutation (`default_rng([seed, epoch])`); region sampling for that sample uses
`default_rng([seed, s, i])`. So a run restarted at step `s` sees exactly the batches an
uninterrupted run would have seen, and the only iterator state to checkpoint is the step.

Bad images: an image that fails to decode is reported once through `ProblemLog` (or raises
`DataError` in strict mode) and replaced by the next slot of the same permutation, which is
itself deterministic, so the batch stays a function of `(seed, s)`.

Prefetching uses plain Python threads and a bounded queue. PIL decoding and resizing release
the GIL, so threads overlap I/O and decoding with the jitted step; `grain` would add a heavy
dependency and multiprocess workers that fight XLA for the same few cores (2 here), and
multiprocess workers need picklable state we do not otherwise have.

numpy/PIL only (no jax): the trainer turns batches into sharded arrays.
"""

from __future__ import annotations

import glob
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from clocmllm.data.interleaved import interleaved_to_pairs, is_interleaved_jsonl, iter_interleaved_jsonl
from clocmllm.data.problems import ProblemLog
from clocmllm.data.regions import RegionRecord, iter_region_jsonl
from clocmllm.encoder.preprocess import CLIP_MEAN, CLIP_STD, boxes_to_unit, preprocess_image

# texts -> int32 [n, context_length]
Tokenize = Callable[[Sequence[str]], np.ndarray]


def region_files(path: str | os.PathLike, split: str = "train") -> list[str]:
    """The JSONL files behind a data path (file, shard folder, or world folder + split)."""
    path = str(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such file or folder of region JSONL")
    shards = sorted(glob.glob(os.path.join(path, "*.jsonl")))
    if shards:
        return shards
    sub = os.path.join(path, split)
    if os.path.isdir(sub):
        return region_files(sub, split)
    raise FileNotFoundError(f"{path}: no *.jsonl files and no '{split}/' folder with them")


def load_records(
    path: str | os.PathLike, split: str = "train", problems: ProblemLog | None = None
) -> list[RegionRecord]:
    """All valid records of a data path, in file order; bad lines go to `problems`."""
    problems = problems if problems is not None else ProblemLog()
    out: list[RegionRecord] = []
    for f in region_files(path, split):
        if is_interleaved_jsonl(f):
            # Interleaved documents feed the paired recipes as (image, neighbouring text) pairs.
            pairs = interleaved_to_pairs(iter_interleaved_jsonl(f, problems))
            out.extend(RegionRecord(image=img, caption=text) for img, text in pairs)
        else:
            out.extend(iter_region_jsonl(f, problems))
    if not out:
        raise ValueError(f"{path}: no valid region records ({problems.summary()})")
    return out


@dataclass
class PipelineConfig:
    """What a batch looks like. Field names match the trainer config's `data:` section."""

    image_size: int
    batch_size: int
    num_regions: int = 4  # M, regions sampled per image
    seed: int = 0
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    threads: int = 2
    prefetch: int = 2  # batches waiting in the queue


@dataclass
class RegionDataset:
    """Records + preprocessing; `batch(step)` is a pure function of (seed, step)."""

    records: list[RegionRecord]
    cfg: PipelineConfig
    tokenize: Tokenize
    problems: ProblemLog = field(default_factory=ProblemLog)
    process_index: int = 0
    process_count: int = 1
    # Region phrases are short noun phrases: a tokenizer with a shorter context for them
    # (None: `tokenize`) makes the text tower's pass over B*M phrases several times cheaper.
    tokenize_regions: Tokenize | None = None

    def __post_init__(self) -> None:
        self._bad: set[int] = set()
        self._lock = threading.Lock()
        self._perms: dict[int, np.ndarray] = {}
        if self.cfg.batch_size % self.process_count:
            raise ValueError(f"batch_size {self.cfg.batch_size} not divisible by {self.process_count} hosts")

    def __len__(self) -> int:
        return len(self.records)

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._perms:
                if len(self._perms) > 4:
                    self._perms.pop(min(self._perms))
                rng = np.random.default_rng([self.cfg.seed, epoch])
                self._perms[epoch] = rng.permutation(len(self.records))
            return self._perms[epoch]

    def _decode(self, idx: int) -> tuple[np.ndarray, object] | None:
        rec = self.records[idx]
        try:
            with Image.open(rec.image_path) as im:
                im.load()
                return preprocess_image(im, self.cfg.image_size, self.cfg.mean, self.cfg.std)
        except Exception as err:  # noqa: BLE001 - any decode failure is a data problem
            with self._lock:
                first = idx not in self._bad
                self._bad.add(idx)
            if first:
                self.problems.add(rec.image_path, None, "image", f"cannot decode image: {err}")
            return None

    def example(self, step: int, i: int) -> dict:
        """Sample `i` of the global batch at `step`, decoded and region-sampled."""
        n = len(self.records)
        pos = step * self.cfg.batch_size + i
        epoch, slot = divmod(pos, n)
        perm = self._perm(epoch)
        for k in range(n):
            idx = int(perm[(slot + k) % n])
            if idx in self._bad:
                continue
            got = self._decode(idx)
            if got is not None:
                break
        else:
            raise ValueError(f"no decodable image left ({self.problems.summary()})")
        image, geom = got
        rec = self.records[idx]
        rng = np.random.default_rng([self.cfg.seed, step, i])
        m = self.cfg.num_regions
        chosen = sample_regions(len(rec.regions), m, rng)
        boxes = np.zeros((m, 4), np.float32)
        valid = np.zeros((m,), bool)
        texts = [""] * m
        if len(chosen):
            boxes[: len(chosen)] = boxes_to_unit([rec.regions[j].box for j in chosen], geom)
            valid[: len(chosen)] = True
            for r, j in enumerate(chosen):
                texts[r] = rec.regions[j].text
        return {
            "image": image,
            "caption": rec.caption,
            "boxes": boxes,
            "valid": valid,
            "texts": texts,
            "index": idx,
        }

    def batch(self, step: int, pool: ThreadPoolExecutor | None = None) -> dict[str, np.ndarray]:
        """This host's slice of the global batch at `step`, as numpy arrays.

        Keys: images f32 [b,S,S,3], text i32 [b,T], region_boxes f32 [b,M,4] (unit square),
        region_valid bool [b,M], region_text i32 [b,M,T], index i64 [b] (record index).
        """
        local = self.cfg.batch_size // self.process_count
        ids = range(self.process_index * local, (self.process_index + 1) * local)
        fn = lambda i: self.example(step, i)
        exs = list(pool.map(fn, ids)) if pool is not None else [fn(i) for i in ids]
        m = self.cfg.num_regions
        captions = self.tokenize([e["caption"] for e in exs])
        region_texts = [t or " " for e in exs for t in e["texts"]]
        region_tok = (self.tokenize_regions or self.tokenize)(region_texts).reshape(local, m, -1)
        valid = np.stack([e["valid"] for e in exs])
        region_tok = np.where(valid[..., None], region_tok, 0).astype(np.int32)
        return {
            "images": np.stack([e["image"] for e in exs]),
            "text": np.asarray(captions, np.int32),
            "region_boxes": np.stack([e["boxes"] for e in exs]),
            "region_valid": valid,
            "region_text": region_tok,
            "index": np.asarray([e["index"] for e in exs], np.int64),
        }


# Lengths a trimmed phrase (`trim_region_text`) or caption (`trim_captions`) array may take:
# few shapes, so few recompiles.
# 6 fits the synthetic world's 'size colour shape' phrases (SOT + 3 words + EOT = 5 tokens)
# without 3 dead tokens of 8 (the tiny CLOC step's phrase pass is ~1/4 of its text work).
PHRASE_BUCKETS = (4, 6, 8, 12, 16, 24, 32, 48, 64)


def pooled_positions(tokens: np.ndarray, eot_token_id: int) -> np.ndarray:
    """Index of each row's first EOT [...], its last position when it has none: where the text
    tower pools (`models.text.first_eot_index`)."""
    is_eot = tokens == eot_token_id
    return np.where(is_eot.any(-1), is_eot.argmax(-1), tokens.shape[-1] - 1)


def phrase_length(tokens: np.ndarray, valid: np.ndarray, eot_token_id: int) -> int:
    """Shortest length [.., :L] that keeps the first EOT of every valid row of `tokens` [.., T].

    A valid row without EOT (truncated by a tokenizer that drops it) needs all T tokens: the
    text tower pools such a row at its last position. Invalid rows do not count (their
    embeddings are masked out of every loss term).
    """
    need = np.where(valid.astype(bool), pooled_positions(tokens, eot_token_id) + 1, 0)
    return int(need.max(initial=1))


def trim_region_text(
    batch: dict[str, np.ndarray], eot_token_id: int, floor: int = 0
) -> dict[str, np.ndarray]:
    """The batch with `region_text` [b, M, T] cut to the smallest bucket length, at least
    `floor`, that keeps every valid phrase's first EOT (`PHRASE_BUCKETS`, at most T).

    Why this is exact: the text tower is causal and pools at the first EOT, so the tokens
    after it cannot change a phrase's embedding (nor receive gradient). Noun phrases are 2-6
    words, so at `data.region_context_length: 16` the CLOC step's extra text pass over B*M
    phrases shrinks ~2x (3 words + SOT + EOT = 5 -> 8 tokens). Bucketing bounds the jitted
    step to a few shapes. With several hosts every host must trim to the same length, so
    the trainer only trims on a single process (tests/test_encoder_pipeline.py checks loss
    and gradients equal trimmed vs untrimmed). `floor`: as for `trim_captions`, the longest
    length used so far, so a run's phrase length only grows.
    """
    if "region_text" not in batch:
        return batch
    tokens = batch["region_text"]
    need = max(phrase_length(tokens, batch["region_valid"], eot_token_id), floor)
    return {**batch, "region_text": _cut_to_bucket(tokens, need)}


def trim_captions(batch: dict[str, np.ndarray], eot_token_id: int, floor: int = 0) -> dict[str, np.ndarray]:
    """The batch with its captions `text` [B, T] cut to the smallest `PHRASE_BUCKETS` length,
    at least `floor`, that keeps every caption's first EOT (at most T).

    Exact for the reason `trim_region_text` is: the causal text tower pools at the first EOT,
    so the tokens after it change nothing and get no gradient. Captions are padded to the
    context length (77 for the CLIP presets) and most are far shorter: at the batch's
    longest caption the text tower does that much less work. `floor`: the trainer passes the
    longest length it has used so far, so lengths only grow and a run compiles its step for
    a few lengths, not for every batch's longest caption.
    """
    tokens = batch["text"]
    need = max(phrase_length(tokens, np.ones(tokens.shape[:-1], bool), eot_token_id), floor)
    return {**batch, "text": _cut_to_bucket(tokens, need)}


def _cut_to_bucket(tokens: np.ndarray, need: int) -> np.ndarray:
    """tokens [..., T] cut to the smallest `PHRASE_BUCKETS` length >= need; as is when none is
    below T."""
    length = next((b for b in PHRASE_BUCKETS if b >= need), tokens.shape[-1])
    return tokens if length >= tokens.shape[-1] else np.ascontiguousarray(tokens[..., :length])


def phrase_count_bucket(
    unique: int, slots: int, align: int = 1, steps: int = 16, min_grain: int = 8, floor: int = 0
) -> int:
    """Rows the de-duplicated phrase array is padded to: `unique` rounded up to a multiple of
    max(ceil(slots / steps), min_grain) (itself a multiple of `align`), at least `floor`, at
    most `slots` rounded up to `align`.

    Why: jit compiles once per shape; the distinct-phrase count of a batch varies a little from
    batch to batch (the synthetic world at B*M = 256: ~101 +- 3), so 16 steps keep it to one or
    two shapes; `min_grain` keeps small batches (B*M = 16 in the tests) to two. `align` = the
    device count, so the rows shard evenly over the batch mesh. `floor`: the trainer passes the
    largest row count it has used so far, so the count only grows and a run compiles its step
    for one or two counts, not for every count its batches happen to need (each compile costs
    ~10 s at `tiny`, more than a short run's de-duplication saves).
    """
    grain = -(-max(min_grain, -(-slots // steps)) // align) * align
    top = -(-slots // align) * align
    return min(top, max(grain, floor, -(-unique // grain) * grain))


def dedup_region_text(
    batch: dict[str, np.ndarray], align: int = 1, min_rows: int = 0
) -> dict[str, np.ndarray]:
    """The batch with `region_text` [b, M, T] replaced by its distinct rows `region_phrases`
    [U, T] (zero-padded to `phrase_count_bucket` rows) and `region_phrase_index` [b, M] int32
    into them; `make_loss_fn` encodes the U phrases once and gathers their embeddings.

    Why this is exact: the text tower embeds each row independently, so equal rows have equal
    embeddings, and the gather's backward sums the gradients of a phrase's occurrences before
    the one pass back through the tower - the same sum the per-slot passes give, in another
    order (tests/test_encoder_losses.py checks loss and gradients). Padded (invalid) slots
    hold all-zero rows and share one. Real phrase data repeats (the synthetic world has 112
    distinct phrases; GRIT-style noun phrases recur), so the text pass over B*M phrases
    shrinks to U. When the bucket saves no row the batch is returned unchanged (random
    phrases without repeats: the gather cost +3.6 ms of a 128 ms tiny step). Like trimming,
    every host must produce the same U, so the trainer does this on a single process only.
    """
    if "region_text" not in batch:
        return batch
    tokens = batch["region_text"]
    b, m, t = tokens.shape
    flat = np.ascontiguousarray(tokens.reshape(b * m, t))
    uniq, index = np.unique(flat, axis=0, return_inverse=True)
    rows = phrase_count_bucket(len(uniq), b * m, align, floor=min_rows)
    if rows >= b * m:  # nothing saved (e.g. no repeats): the gather would only cost time
        return batch
    phrases = np.zeros((rows, t), tokens.dtype)
    phrases[: len(uniq)] = uniq
    out = {k: v for k, v in batch.items() if k != "region_text"}
    out["region_phrases"] = phrases
    out["region_phrase_index"] = index.reshape(b, m).astype(np.int32)
    return out


class PhraseDedup:
    """`dedup_region_text` across a run's batches: the row count only grows (each batch's
    floor is the largest count so far, all B*M slots once a batch had nothing to save), so a
    run's step sees one or two phrase shapes and compiles once for each."""

    def __init__(self, align: int = 1):
        self.align = align
        self.rows = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dedup_region_text(batch, self.align, min_rows=self.rows)
        self.rows = len(out["region_phrases"]) if "region_phrases" in out else out["region_valid"].size
        return out


def sample_regions(count: int, m: int, rng: np.random.Generator) -> list[int]:
    """Indices of up to `m` regions: random without replacement when more, all when fewer."""
    if count <= m:
        return list(range(count))
    return sorted(int(j) for j in rng.choice(count, size=m, replace=False))


class BatchIterator:
    """Background-prefetched batches from `start_step` on; `step` is the next step to return.

    One producer thread walks the steps in order and fills a bounded queue; inside a batch
    a small thread pool decodes images in parallel. `close()` stops it (also on GC/exit).
    `prepare` (the trainer's `batch_prep.BatchPrep`) runs on each batch in that thread, in
    step order, so its host work overlaps the step too; when it has a `state_dict()`,
    `prep_state` is that state as it was right after the last returned batch (the thread
    may be batches ahead), which is what a checkpoint of that step must hold.
    """

    def __init__(
        self,
        dataset: RegionDataset,
        start_step: int = 0,
        prefetch: int | None = None,
        prepare: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    ):
        self.dataset = dataset
        self.step = start_step
        self._prepare = prepare
        self._snapshot: Callable[[], dict | None] = getattr(prepare, "state_dict", lambda: None)
        self.prep_state = self._snapshot()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch or dataset.cfg.prefetch))
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=max(1, dataset.cfg.threads))
        self._thread = threading.Thread(target=self._produce, args=(start_step,), daemon=True)
        self._thread.start()

    def _produce(self, step: int) -> None:
        while not self._stop.is_set():
            try:
                batch = self.dataset.batch(step, self._pool)
                if self._prepare is not None:
                    batch = self._prepare(batch)
                item = (step, batch, self._snapshot())
            except Exception as err:  # noqa: BLE001 - handed to the consumer, raised there
                item = (step, err, None)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], Exception):
                return
            step += 1

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        step, batch, prep_state = self._queue.get()
        if isinstance(batch, Exception):
            raise batch
        assert step == self.step, (step, self.step)
        self.step += 1
        self.prep_state = prep_state
        return batch

    def state(self) -> dict:
        """What a checkpoint must hold to resume this iterator exactly."""
        return {"step": self.step, "seed": self.dataset.cfg.seed}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __del__(self) -> None:
        try:
            self._stop.set()
        except Exception:  # noqa: BLE001
            pass
