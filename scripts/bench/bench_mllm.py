"""MLLM benchmarks, each measured against a peer in the same run, side by side.

Command:  OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/bench_mllm.py [--sizes tiny small] [--reps 7]
Expected time: ~1-3 min on 2 CPU cores (tiny + small). Prints a table; targets:
  1. training step (forward + backward + AdamW) of ClocLlava vs transformers'
     LlavaForConditionalGeneration loaded from our stock folder (same weights, same batch):
     ratio <= 1.1;
  2. region features for 8 boxes (RoI-Align and the CLOC prompter) vs one tower forward:
     <= 10 %;
  3. greedy generation tokens/s with and without the KV cache.
Timings are medians of `--reps` runs (and the ratio of the fastest runs), ours and the peer
interleaved so machine load hits both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import transformers  # noqa: E402

from clocmllm.mllm import tiny  # noqa: E402
from clocmllm.mllm.model import MllmConfig, build_model  # noqa: E402
from clocmllm.mllm.save import save_model  # noqa: E402
from clocmllm.mllm.tokenizer import IMAGE_TOKEN, build_tokenizer  # noqa: E402


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def build(size: str, root: Path, prompter: bool = False):
    tower = tiny.make_tower_folder(root / f"tower_{size}_{int(prompter)}", size=size, prompter=prompter)
    tok = build_tokenizer(["where is the red circle ? it is a small blue square ."])
    torch.manual_seed(0)
    cfg = MllmConfig(
        tower={"path": str(tower)},
        regions="shared" if prompter else "none",
        llm={"config": tiny.llm_config("llama", size)},
    )
    return build_model(cfg, tok), tok


def batch_for(model, tok, batch: int, text_len: int):
    n = model.tower.num_tokens
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(10, 1000, (batch, text_len), generator=g)
    ids = torch.cat([text[:, :4], torch.full((batch, n), image_id), text[:, 4:]], dim=1)
    s = model.tower.image_size
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, s, s, generator=g),
        "labels": ids.masked_fill(ids == image_id, -100),
    }


def bench_train(size: str, root: Path, reps: int, batch: int) -> dict:
    from transformers import LlavaForConditionalGeneration

    model, tok = build(size, root)
    model.train()
    model.tower.set_trainable(True)  # tower, connector and LLM all train in both, to compare like for like
    for p in model.parameters():
        p.requires_grad_(True)
    folder = root / f"stock_{size}"
    save_model(model, tok, folder)
    stock = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    stock.train()
    b = batch_for(model, tok, batch, 48)
    opt_a = torch.optim.AdamW(model.parameters(), lr=1e-5)
    opt_b = torch.optim.AdamW(stock.parameters(), lr=1e-5)

    def step(m, opt):
        def f():
            loss = m(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return f

    ours, theirs = step(model, opt_a), step(stock, opt_b)
    ours(), theirs()  # warm-up
    a, c = [], []
    for i in range(reps):  # alternate who goes first, so neither always runs on the other's cache
        if i % 2:
            c += timed(theirs, 1)
            a += timed(ours, 1)
        else:
            a += timed(ours, 1)
            c += timed(theirs, 1)
    ma, mc = statistics.median(a), statistics.median(c)
    return {
        "min_ratio": min(a) / min(c),
        "size": size,
        "batch": batch,
        "seq": b["input_ids"].shape[1],
        "ours_s": ma,
        "llava_s": mc,
        "ratio": ma / mc,
    }


def bench_regions(size: str, root: Path, reps: int) -> dict:
    model, _ = build(size, root, prompter=True)
    model.eval()
    s = model.tower.image_size
    x = torch.randn(1, 3, s, s)
    boxes = torch.rand(1, 8, 2).sort(-1).values.repeat_interleave(2, -1)[..., [0, 2, 1, 3]]
    with torch.no_grad():
        sel, last = model.tower(x)
        prompter = model.tower.prompter

        def tower():
            model.tower(x)

        def roi():
            model.tower.prompter = None
            model.tower.region_features(sel, last, boxes)
            model.tower.prompter = prompter

        def prm():
            model.tower.region_features(sel, last, boxes)

        tower(), roi(), prm()
        t, r, p = [], [], []
        for _ in range(reps):
            t += timed(tower, 1)
            r += timed(roi, 1)
            p += timed(prm, 1)
    mt, mr, mp = (statistics.median(x) for x in (t, r, p))
    return {"size": size, "tower_s": mt, "roi_share": mr / mt, "prompter_share": mp / mt}


def bench_generate(size: str, root: Path, reps: int, new_tokens: int) -> dict:
    model, tok = build(size, root)
    model.eval()
    b = batch_for(model, tok, 1, 16)
    res = {}
    for cache in (True, False):

        def gen(cache: bool = cache):
            model.generate(
                b["input_ids"],
                pixel_values=b["pixel_values"],
                max_new_tokens=new_tokens,
                use_cache=cache,
                eos_token_id=-1,
                pad_token_id=0,
            )

        gen()
        res[cache] = new_tokens / statistics.median(timed(gen, max(1, reps // 2)))
    return {
        "size": size,
        "new_tokens": new_tokens,
        "tok_s_cache": res[True],
        "tok_s_no_cache": res[False],
        "speedup": res[True] / res[False],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(tiny.LLM_SIZES))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()  # eos=-1 (fixed length) warns on every call
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, reps {args.reps}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(
            "\n1. training step, ClocLlava vs transformers LlavaForConditionalGeneration (target ratio <= 1.1)"
        )
        print(
            f"{'size':6} {'batch':>5} {'seq':>5} {'ours ms':>9} {'llava ms':>9} {'ratio':>6} {'min-ratio':>9}"
        )
        for size in args.sizes:
            r = bench_train(size, root, args.reps, args.batch)
            print(
                f"{size:6} {r['batch']:5d} {r['seq']:5d} {r['ours_s'] * 1e3:9.1f} {r['llava_s'] * 1e3:9.1f} {r['ratio']:6.3f} {r['min_ratio']:9.3f}"
            )
        print("\n2. region features for 8 boxes vs one tower forward (batch 1; target <= 10 %)")
        print(f"{'size':6} {'tower ms':>9} {'roi-align %':>11} {'prompter %':>10}")
        for size in args.sizes:
            r = bench_regions(size, root, args.reps)
            print(
                f"{size:6} {r['tower_s'] * 1e3:9.2f} {100 * r['roi_share']:11.1f} {100 * r['prompter_share']:10.1f}"
            )
        print(f"\n3. greedy generation, {args.new_tokens} new tokens, with vs without KV cache")
        print(f"{'size':6} {'tok/s cache':>12} {'tok/s no cache':>15} {'speedup':>8}")
        for size in args.sizes:
            r = bench_generate(size, root, args.reps, args.new_tokens)
            print(f"{size:6} {r['tok_s_cache']:12.1f} {r['tok_s_no_cache']:15.1f} {r['speedup']:8.2f}")


if __name__ == "__main__":
    main()
