"""CLIP / CLOC pretraining loop, flat and big_vision-style: config -> run -> summary.

    train(config, workdir, data=None, steps=None) -> summary dict

Sections below, in the order a run uses them: config, model and objective, step,
state creation and resumption, logging, the loop. The config is a plain dict (a recipe
YAML under `scripts/recipes/` plus overrides); the full resolved config is written to
`WORKDIR/config.yaml`, and a run in a workdir that already holds checkpoints resumes from
the latest one (refusing if the model shapes or the mode differ).

Objective (CLOC, arXiv 2410.02746, Sec. 3):
    L = L_clip + lambda * (L_region + L_ground),  lambda = share of images with regions.
`mode: clip` trains L_clip only (the baseline); `loss: softmax | sigmoid` picks InfoNCE or
SigLIP for the image-text and region-text terms. Region texts are embedded by the text
tower (gradients flow into it, as for captions); the text-prompted prompter receives those
same embeddings and its grounding prediction is regressed onto the true boxes.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from clocmllm.encoder.host_malloc import jax_will_run_on_cpu

log = logging.getLogger("clocmllm.encoder.trainer")

# ======================================================================== config
DEFAULTS: dict[str, Any] = {
    "mode": "cloc",  # clip | cloc
    # cloc: the mode's own objective; rocket / lcl: the recipes of `clocmllm.encoder.recipes`
    # (their YAML sections below are validated by the recipe's Config.from_dict)
    "recipe": "cloc",
    "rocket": {},
    "lcl": {},
    "loss": "softmax",  # softmax (InfoNCE) | sigmoid (SigLIP)
    "seed": 0,
    "steps": 1000,
    "model": {"preset": "tiny"},  # a preset name plus field overrides
    "tokenizer": None,  # tokenizer path; None: built from the data (synthetic world vocab)
    # A new run that starts from another checkpoint's weights (a pretrain workdir or the
    # output of `clocmllm import-clip`): step 0, fresh optimizer; encoder/warm_start.py has
    # the rules. Without a model: section (and tokenizer:) the run takes the source's.
    # Only read when the workdir has no checkpoint yet (a resume continues its own run).
    "init_from": None,
    "data": {
        "path": None,
        "split": "train",
        "eval_path": None,  # None: the data folder's `eval/` split when it exists
        "eval_split": "eval",
        "batch_size": 32,
        "num_regions": 4,  # M regions per image (paper: 4; 2 is about as good)
        # Tokens per region phrase (<= model.context_length). VESL phrases are short noun
        # phrases (<= 20 words after filtering): 16 tokens keep the text tower's pass over
        # B*M phrases cheap (CLOC step overhead) at no loss of content; null = context_length.
        "region_context_length": 16,
        # CLOC: encode each distinct region phrase of a batch once (exact; single process
        # only, see input_pipeline.dedup_region_text)
        "dedup_phrases": True,
        # CLOC: lay the region phrases end to end in rows of 16+ tokens, each attending to its
        # own tokens only, and compute a shared first token (SOT) once (exact; single process
        # only, see encoder/text_packing.py). auto: from text width 256 (it pays there, not at
        # `tiny`'s 64: text_packing.PACK_MIN_WIDTH)
        "pack_phrases": "auto",
        # CLOC recipe, both modes: the same for the captions, once that saves >= 10% of their
        # tokens (captions vary in length more than phrases; encoder/text_packing.py). Off by
        # default: exact, but its speed at real widths and caption lengths is not measured yet
        # (the world's captions at `tiny`: a wash)
        "pack_captions": False,
        "threads": 2,
        "prefetch": 2,
        "strict": False,
    },
    "optim": {
        "lr": 5e-4,
        "warmup_steps": 2000,
        "weight_decay": 0.2,
        "b1": 0.9,
        "b2": 0.98,
        "eps": 1e-6,
        "clip_norm": 1.0,
    },
    "cloc": {"text_filter": 0.9},  # drop region negatives whose text cosine is above this
    "mesh": {"data": -1, "fsdp": 1},
    "distributed": False,  # jax.distributed.initialize() when multi-host env vars exist
    # glibc malloc tuning for CPU steps (encoder/host_malloc.py): reuse | glibc | auto (reuse
    # when JAX runs on the CPU, see `wants_malloc_reuse`)
    "malloc": "auto",
    "checkpoint": {"every": 500, "keep": 3},
    "log_every": 10,
    "eval_every": 0,  # 0: only at the end (when an eval split exists)
    "eval": {"max_images": 500, "batch_size": 32, "at_end": True},
    "progress": True,
    # Test hooks (host side, so the compiled step is the same as without them): NaN images
    # in the batch of one step; a pause per step so a test can SIGKILL a run mid-way.
    "debug": {"nan_at_step": -1, "step_delay_s": 0.0},
}

# Model fields that change numerics or speed but not the checkpoint's shapes/meaning.
_COMPUTE_ONLY = {"dtype", "attention_impl", "remat"}


class IncompatibleCheckpoint(ValueError):
    """The workdir holds checkpoints of a different model or mode."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient or parameter norm; the last good checkpoint is kept."""


def deep_merge(base: Mapping, over: Mapping) -> dict:
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_overrides(config: Mapping, sets: list[str]) -> dict:
    """`--set a.b=value` overrides: dotted keys, YAML-parsed values (`2`, `true`, `[1, 2]`)."""
    out = copy.deepcopy(dict(config))
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.setdefault(p, {}), dict):
                raise ValueError(f"--set {key}: {p!r} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return out


def load_recipe(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a training recipe must be a YAML mapping")
    return cfg


def resolve_config(config: Mapping, data: str | None = None, steps: int | None = None) -> dict:
    """Recipe + defaults + CLI arguments -> the full config (model section fully expanded)."""
    from clocmllm.encoder.config import ModelConfig, load_model_config
    from clocmllm.encoder.text_packing import wants_packing

    _check_keys(config, DEFAULTS, "")
    if isinstance(config.get("model"), str):  # `model: tiny` is short for `model: {preset: tiny}`
        config = {**config, "model": {"preset": config["model"]}}
    if config.get("init_from"):
        from clocmllm.encoder.warm_start import source_config

        config = {**config, "init_from": str(Path(config["init_from"]).absolute())}
        source = source_config(config["init_from"])[1]  # a folder without weights: refused here
        if "model" not in config:  # the source's model, whole
            config["model"] = dict(source["model"])
    cfg = deep_merge(DEFAULTS, config)
    if data is not None:
        cfg["data"]["path"] = str(data)
    if steps is not None:
        cfg["steps"] = int(steps)
    if cfg["mode"] not in ("clip", "cloc"):
        raise ValueError(f"mode: {cfg['mode']!r} must be 'clip' or 'cloc'")
    if cfg["recipe"] not in ("cloc", "rocket", "lcl"):
        raise ValueError(f"recipe: {cfg['recipe']!r} must be 'cloc', 'rocket' or 'lcl'")
    if cfg["loss"] not in ("softmax", "sigmoid"):
        raise ValueError(f"loss: {cfg['loss']!r} must be 'softmax' or 'sigmoid'")
    for key in ("pack_phrases", "pack_captions"):  # refused here, before any work
        wants_packing(cfg["data"][key], 0, f"data.{key}")
    model = {"preset": cfg["model"]} if isinstance(cfg["model"], str) else dict(cfg["model"])
    if "preset" in model:
        preset = model.pop("preset")
        mc = load_model_config(preset, model)
    else:
        mc = ModelConfig.from_dict(model, source="config model:")
    cfg["model"] = mc.to_dict()
    return cfg


def _check_keys(cfg: Mapping, ref: Mapping, prefix: str) -> None:
    for k, v in cfg.items():
        if k not in ref:
            raise ValueError(f"config: unknown key {prefix}{k!r}; known: {sorted(ref)}")
        if (
            isinstance(v, Mapping)
            and isinstance(ref[k], Mapping)
            and k not in ("model", "optim", "rocket", "lcl")
        ):
            _check_keys(v, ref[k], f"{prefix}{k}.")


def incompatible_keys(saved: Mapping, new: Mapping) -> list[str]:
    """Dotted keys whose values differ in a way a checkpoint cannot absorb."""
    diffs = (
        [f"mode ({saved.get('mode')} -> {new.get('mode')})"] if saved.get("mode") != new.get("mode") else []
    )
    if saved.get("recipe", "cloc") != new.get("recipe", "cloc"):
        diffs.append(f"recipe ({saved.get('recipe', 'cloc')} -> {new.get('recipe', 'cloc')})")
    if saved.get("loss") != new.get("loss"):
        diffs.append(f"loss ({saved.get('loss')} -> {new.get('loss')})")
    sm, nm = saved.get("model", {}), new.get("model", {})
    # a field added after the run was saved (e.g. prompter_box_mask) reads as its default
    from clocmllm.encoder.config import ModelConfig

    defaults = ModelConfig().to_dict()
    for k in sorted(set(sm) | set(nm)):
        old, cur = sm.get(k, defaults.get(k)), nm.get(k, defaults.get(k))
        if k not in _COMPUTE_ONLY and old != cur:
            diffs.append(f"model.{k} ({old} -> {cur})")
    return diffs


# ======================================================================== tokenizer
def build_tokenizer(cfg: dict, records, workdir: Path):
    """The caption tokenizer; sets `cfg['tokenizer']` and the model's vocab/eot/pad from it.

    With `tokenizer: PATH` that file is used. Otherwise a word-level vocabulary is built from
    the training captions and region phrases (plus a world's `world.json` vocabulary when the
    data is a synthetic world) and saved as `WORKDIR/tokenizer.json`; a resumed run reuses
    the saved file so token ids never change under a checkpoint.
    """
    from clocmllm.encoder.checkpoints import TOKENIZER_FILE
    from clocmllm.encoder.config import ModelConfig
    from clocmllm.encoder.tokenizer import Tokenizer, build_word_tokenizer, tokenizer_overrides

    ctx = int(cfg["model"]["context_length"])
    own = workdir / TOKENIZER_FILE
    if cfg["tokenizer"]:
        path = Path(cfg["tokenizer"])
        path = path if path.is_absolute() else workdir / path
        tok = Tokenizer.from_file(path, context_length=ctx)
    elif own.exists():
        tok = Tokenizer.from_file(own, context_length=ctx)
        cfg["tokenizer"] = TOKENIZER_FILE
    else:
        texts = [r.caption for r in records] + [g.text for r in records for g in r.regions]
        texts += _world_words(cfg["data"]["path"])
        tok = build_word_tokenizer(texts, own, context_length=ctx)
        cfg["tokenizer"] = TOKENIZER_FILE  # relative to the workdir, so a workdir can move
    over = tokenizer_overrides(tok)
    cfg["model"] = ModelConfig.from_dict({**cfg["model"], **over}).to_dict()
    rctx = min(int(cfg["data"]["region_context_length"] or ctx), ctx)
    region_tok = Tokenizer.from_file(tok.source, context_length=rctx)
    return tok.encode_batch, region_tok.encode_batch, tok


def _world_words(path) -> list[str]:
    """Every string of a synthetic world's vocabulary (so eval-only words get ids too)."""
    meta = Path(path) / "world.json"
    if not meta.is_file():
        return []
    out: list[str] = []

    def walk(x):
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, Mapping):
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(json.loads(meta.read_text()).get("vocabulary", {}))
    return out


# ======================================================================== model and objective
def make_loss_fn(model, cfg: dict):
    """params, batch -> (loss, metrics dict). Pure; jitted inside the step."""
    import jax
    import jax.numpy as jnp

    from clocmllm.encoder import losses

    mode, kind = cfg["mode"], cfg["loss"]
    text_filter = float(cfg["cloc"]["text_filter"])

    def packed_text(m, batch, prefix):  # sequences packed into rows (encoder/text_packing.py)
        keys = ("tokens", "positions", "segments", "pool")
        return m.encode_text_packed(*(batch[f"{prefix}_{k}"] for k in keys), batch.get(f"{prefix}_sot"))

    def captions(m, batch):
        return (
            packed_text(m, batch, "text_pack")
            if "text_pack_tokens" in batch
            else m.encode_text(batch["text"])
        )

    def forward(m, batch):
        if mode != "cloc":  # the embedding alone: the last vision block at the class token only
            return {"image_emb": m.encode_image(batch["images"]), "text_emb": captions(m, batch)}
        tokens = m.encode_image_tokens(batch["images"])
        out = {"image_emb": m.pool_image(tokens), "text_emb": captions(m, batch)}
        # region phrases use their own (shorter) token length, so a separate tower call
        if "region_pack_tokens" in batch:  # phrases packed into rows (`pack_region_phrases`)
            rtext = packed_text(m, batch, "region_pack")[batch["region_phrase_index"]]
        elif "region_phrase_index" in batch:  # distinct phrases once (`dedup_region_text`)
            rtext = m.encode_text(batch["region_phrases"])[batch["region_phrase_index"]]
        else:
            b, mm, t = batch["region_text"].shape
            rtext = m.encode_text(batch["region_text"].reshape(b * mm, t)).reshape(b, mm, -1)
        out["region_text_emb"] = rtext
        (out["region_emb"], _), (_, feat) = m.region_and_text_prompt_embed(
            tokens, batch["region_boxes"], rtext
        )
        out["pred_boxes"] = m.ground(feat)
        return out

    def loss_fn(params, batch):
        out = model.apply({"params": params}, batch, method=forward)
        scale, bias = params["logit_scale"], params["logit_bias"]
        if kind == "sigmoid":
            l_clip = losses.siglip_loss(out["image_emb"], out["text_emb"], scale, bias)
        else:
            l_clip = losses.clip_softmax_loss(out["image_emb"], out["text_emb"], scale)
        metrics = {"clip_loss": l_clip, "logit_scale": jnp.exp(scale)}
        loss = l_clip
        if mode == "cloc":
            valid = batch["region_valid"]
            # region-text stays InfoNCE under `loss: sigmoid` too (the losses module has no
            # sigmoid region variant; CLOC's region loss is InfoNCE in the paper)
            l_region = losses.region_text_loss(
                out["region_emb"], out["region_text_emb"], valid, scale, filter_threshold=text_filter
            )
            l_ground = losses.grounding_loss(out["pred_boxes"], batch["region_boxes"], valid)
            loss, terms = losses.cloc_total(l_clip, l_region, l_ground, valid)
            metrics.update(region_loss=l_region, ground_loss=l_ground, lam=terms["lambda"])
        metrics["loss"] = loss
        return loss, metrics

    del jax
    return loss_fn


# ======================================================================== step
def make_train_step(model, tx, schedule, cfg: dict, loss_fn=None):
    """(state, batch) -> (state, metrics); the caller jits it with shardings.

    `loss_fn(params, batch) -> (loss, metrics)` defaults to `make_loss_fn(model, cfg)`;
    the rocket / LCL recipes pass their own.
    """
    import jax
    import optax

    loss_fn = loss_fn or make_loss_fn(model, cfg)

    def train_step(state, batch):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["param_norm"] = optax.global_norm(params)
        metrics["lr"] = schedule(state.step)
        new = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, rng=jax.random.fold_in(state.rng, 1)
        )
        return new, metrics

    return train_step


def wants_malloc_reuse(mode: str) -> bool:
    """Whether `train()` applies `host_malloc.reuse_freed_memory()` and a synchronous CPU
    client (config key `malloc`): `reuse`, `glibc`, or `auto` = when the steps run on the CPU.

    On the CPU the tuning removes the page faults of XLA's per-step temp buffer: `tiny` step
    -15%, ViT-S/16 batch 32 -22% (11.5 -> 9.0 s), same peak RSS (docs/benchmarks.md, "where the
    CPU time goes", items 6 and 8; since item 11 without the one-arena cap, which cost the
    2-core `tiny` trainer 1.4x its time). With an accelerator the host heap holds no step
    buffers, so there is nothing to gain.
    """
    if mode not in ("auto", "reuse", "glibc"):
        raise ValueError(f"malloc: {mode!r} must be 'auto', 'reuse' or 'glibc'")
    if mode != "auto":
        return mode == "reuse"
    return jax_will_run_on_cpu()


def step_compiler_options(remat: bool = False) -> dict | None:
    """XLA options for the jitted train step: on CPU, prefer 512-bit vectors.

    XLA CPU's LLVM codegen defaults to 256-bit vectors; on AVX-512 CPUs the elementwise
    fusions (sigmoid/erf GELU, softmax, LayerNorm) run up to 2x faster at 512 (quick_gelu
    on [4160, 256]: 0.61 -> 0.41 ms) and the `tiny` CLIP step ~7% faster, one thread
    (docs/benchmarks.md). A preference only: CPUs without AVX-512 keep their widest vectors.
    Same numerics (no fast-math). Other backends get no options.

    `remat` (the model's `remat: true`) adds XLA CPU's memory-optimised scheduler: its default,
    concurrency-optimised one schedules the recomputed forwards so that the step keeps as much
    memory as without remat (ViT-S/16 CLOC step, batch 32: temp buffer 4089 MB without remat,
    4086 MB with it; 2880 MB with remat and this scheduler; `scripts/bench/bench_step_memory.py
    temp`, docs/benchmarks.md item 8).
    """
    import jax

    if jax.default_backend() != "cpu":
        return None
    options: dict = {"xla_cpu_prefer_vector_width": 512}
    if remat:
        options["xla_cpu_scheduler_type"] = "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
    return options


# ======================================================================== state creation / resumption
def abstract_state(model, tx, seed: int, recipe=None):
    """ShapeDtypeStruct tree of the TrainState (nothing allocated), and its init function.

    `recipe = (module, recipe_config)` adds that recipe's params under `module.PARAM_KEY`.
    """
    import jax

    from clocmllm.encoder.train_state import new_state

    def init():
        params = model.init(jax.random.PRNGKey(seed), *model.dummy_inputs(1))["params"]
        if recipe is not None:
            mod, rcfg = recipe
            extra = mod.init_extra_params(jax.random.PRNGKey(seed + 2), model.config, rcfg)
            params = {**params, mod.PARAM_KEY: extra}
        return new_state(params, tx, seed)

    return jax.eval_shape(init), init


def _state_shardings(abstract, mesh):
    from clocmllm.encoder.sharding import tree_shardings

    return tree_shardings(abstract, mesh)


# ======================================================================== logging
class MetricsWriter:
    """Appends one JSON object per line to WORKDIR/metrics.jsonl (flushed each write)."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        if path.exists() and start_step >= 0:
            # a resumed run rewrites history from its checkpoint on: drop later lines
            keep = [
                ln
                for ln in path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= start_step
            ]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(k + "\n" for k in keep))
            os.replace(tmp, path)
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, row: Mapping) -> None:
        self.f.write(json.dumps({k: _to_py(v) for k, v in row.items()}) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _to_py(v):
    if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "item"):
        return float(np.asarray(v))
    return v


def plot_metrics(metrics_path: Path, out_png: Path) -> None:
    """Loss curves (every loss term) from metrics.jsonl -> PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("loss", "clip_loss", "region_loss", "ground_loss"):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)


# ======================================================================== the loop
def train(
    config: Mapping, workdir: str | os.PathLike, data: str | None = None, steps: int | None = None
) -> dict:
    """Run (or resume) pretraining in `workdir`; returns a summary dict.

    Raises IncompatibleCheckpoint when `workdir` holds checkpoints of another model/mode,
    TrainingDiverged on a non-finite loss (after keeping the last good checkpoint).
    """
    import jax
    from tqdm import tqdm

    from clocmllm.data.problems import ProblemLog
    from clocmllm.encoder import checkpoints as ck
    from clocmllm.encoder.batch_prep import BatchPrep
    from clocmllm.encoder.flops import batch_step_flops
    from clocmllm.encoder.input_pipeline import BatchIterator, PipelineConfig, RegionDataset, load_records
    from clocmllm.encoder.models.clip import CLIP
    from clocmllm.encoder.optimizer import build_optimizer
    from clocmllm.encoder.sharding import batch_sharding, make_mesh, maybe_initialize_distributed, shard_batch

    # ---- config, workdir, compatibility
    cfg = resolve_config(config, data, steps)
    if wants_malloc_reuse(cfg["malloc"]):
        from clocmllm.encoder.host_malloc import reuse_freed_memory, synchronous_cpu_client

        # both before JAX's CPU client starts (see host_malloc.py); no-ops for a running one
        reuse_freed_memory()
        synchronous_cpu_client()
    maybe_initialize_distributed(bool(cfg["distributed"]))
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    if cfg["data"]["path"] is None:
        raise ValueError("no training data: give data.path in the config or --data DIR")
    problems = ProblemLog(strict=bool(cfg["data"]["strict"]))
    records = load_records(cfg["data"]["path"], cfg["data"]["split"], problems)
    if cfg["init_from"] and not cfg["tokenizer"] and not ck.finished_steps(workdir):
        from clocmllm.data.atomic import write_bytes_atomic
        from clocmllm.encoder.warm_start import source_tokenizer

        # its ids are what the copied text embedding was trained on (rewritten until the
        # run's first checkpoint, so a refused attempt leaves no stale copy behind)
        if (src := source_tokenizer(cfg["init_from"])) is not None:
            write_bytes_atomic(workdir / ck.TOKENIZER_FILE, src.read_bytes())
    tokenize, tokenize_regions, tok = build_tokenizer(
        cfg, records, workdir
    )  # sets cfg['tokenizer'], vocab/eot/pad
    saved = ck.read_config(workdir)
    mgr = ck.manager(workdir, keep=int(cfg["checkpoint"]["keep"]))
    start = mgr.latest_step()
    if start is not None and saved is not None:
        diffs = incompatible_keys(saved, cfg)
        if diffs:
            mgr.close()
            hint = (
                f" It holds weights imported from {saved['imported_from']}: to train from them, "
                f"give a new --workdir and --init-from {workdir}."
                if saved.get("imported_from")
                else " Use a new --workdir (or the same config) to continue."
            )
            raise IncompatibleCheckpoint(
                f"{workdir} holds checkpoints of a different run; differing keys: {', '.join(diffs)}.{hint}"
            )
    if jax.process_index() == 0:
        ck.write_yaml_atomic(workdir / ck.CONFIG_FILE, cfg)

    # ---- model, optimizer, mesh, state
    from clocmllm.encoder.config import ModelConfig

    mc = ModelConfig.from_dict(cfg["model"])
    model = CLIP(mc)
    total = int(cfg["steps"])
    tx, schedule = build_optimizer(cfg["optim"], total)
    mesh = make_mesh(cfg["mesh"])
    recipe = _recipe(cfg)
    abstract, init = abstract_state(model, tx, int(cfg["seed"]), recipe)
    shardings = _state_shardings(abstract, mesh)
    warm_start = None  # what init_from carried over (a fresh run that names one)
    if start is not None:
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        params, opt_state, meta = ck.restore_state(mgr, start, target.params, target.opt_state)
        state = abstract.replace(
            step=jax.device_put(np.int32(meta["step"]), shardings.step),
            params=params,
            opt_state=opt_state,
            rng=jax.device_put(np.asarray(meta["rng"], np.uint32), shardings.rng),
        )
        start = int(meta["data_step"])
        prep_state = meta.get("prep")  # absent in checkpoints written before session 10
        log.info("resumed from %s at step %d", workdir, start)
    else:
        state = jax.jit(init, out_shardings=shardings)()
        start = 0
        prep_state = None
        if cfg["init_from"]:
            from clocmllm.encoder.warm_start import warm_start_params

            params, warm_start = warm_start_params(state.params, cfg["init_from"], cfg["model"])
            state = state.replace(params=params)

    # ---- data
    d = cfg["data"]
    pcfg = PipelineConfig(
        image_size=mc.image_size,
        batch_size=int(d["batch_size"]),
        num_regions=int(d["num_regions"]),
        seed=int(cfg["seed"]),
        threads=int(d["threads"]),
        prefetch=int(d["prefetch"]),
    )
    dataset = RegionDataset(
        records, pcfg, tokenize, problems, jax.process_index(), jax.process_count(), tokenize_regions
    )
    if cfg["recipe"] == "rocket":
        dataset = recipe[0].RocketDataset(dataset, recipe[1], tokenize)
    elif cfg["recipe"] == "lcl":
        from clocmllm.data.interleaved import (
            is_interleaved_jsonl,
            iter_interleaved_jsonl,
            paired_to_interleaved,
        )
        from clocmllm.encoder.input_pipeline import region_files

        mod, lcfg = recipe
        files = region_files(cfg["data"]["path"], cfg["data"]["split"])
        if all(is_interleaved_jsonl(f) for f in files):  # real documents: use them as they are
            docs = [doc for f in files for doc in iter_interleaved_jsonl(f, problems)]
        else:  # paired data: image before or after its caption at random (LCL's recipe)
            docs = paired_to_interleaved(
                ((r.image_path, r.caption) for r in records), pcfg.seed, image_first_p=lcfg.image_first_p
            )
        dataset = mod.LCLDataset(
            docs, lcfg, mc, mod.tokenizer_encode(tok), pcfg.batch_size, pcfg.seed, problems,
            pcfg.threads, pcfg.prefetch, jax.process_index(), jax.process_count(),
        )  # fmt: skip
    eval_records = _eval_records(cfg)

    # ---- step
    bs = batch_sharding(mesh)
    step_fn = jax.jit(
        make_train_step(model, tx, schedule, cfg, _recipe_loss(model, cfg, recipe)),
        in_shardings=(shardings, bs),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
        compiler_options=step_compiler_options(mc.remat),
    )

    # ---- loop
    writer = MetricsWriter(workdir / ck.METRICS_FILE, start if start > 0 else -1)
    every = max(1, int(cfg["checkpoint"]["every"]))
    log_every = max(1, int(cfg["log_every"]))
    eval_every = int(cfg["eval_every"])
    delay = float(cfg["debug"]["step_delay_s"])
    # what the loader's thread does to each batch before the step (encoder/batch_prep.py):
    # captions and phrases cut after their longest first EOT, distinct phrases once, packing;
    # its shape floors continue from the checkpoint, so a resumed run compiles the same shapes
    prep = BatchPrep.from_config(cfg, mc.text_width, mc.eot_token_id, mesh.devices.size, jax.process_count())
    prep.load_state_dict(prep_state)
    it = BatchIterator(dataset, start_step=start, prepare=prep)
    bar = tqdm(
        total=total, initial=start, desc="pretrain", disable=not cfg["progress"] or jax.process_index() != 0
    )
    last: dict = {}
    t_start = time.perf_counter()
    compile_s = None
    last_eval: dict = {}
    # A step's metrics are read while the next step runs (JAX dispatches asynchronously on
    # accelerators), so the device does not wait for the host between steps. The run syncs
    # before a checkpoint or an eval (the state they read is donated to the next step), at
    # its first step (compile time) and with debug.step_delay_s. step_time is the wall time
    # between two steps' ends: what a step costs, host work included.
    pending = None  # (step, metrics on device, host batch) of the step not read yet
    t_mark = time.perf_counter()

    def read(p) -> None:
        """Wait for a dispatched step's metrics; stop on a non-finite state; log a row."""
        nonlocal last, compile_s, t_mark
        step, metrics, host = p
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        dt, t_mark = now - t_mark, now
        if compile_s is None:
            compile_s = dt
        if not all(np.isfinite(metrics[k]) for k in ("loss", "grad_norm", "param_norm")):
            good = mgr.latest_step()
            raise TrainingDiverged(
                f"non-finite training state at step {step}: loss={metrics['loss']}, "
                f"grad_norm={metrics['grad_norm']}, param_norm={metrics['param_norm']}; stopped. "
                f"Last good checkpoint: step {good} in {workdir / ck.CKPT_DIR} (the bad state was not saved)."
            )
        done = step + 1
        last = {k: float(v) for k, v in metrics.items()}
        if done % log_every == 0 or done == total or done == start + 1:
            row = {"step": done, **last, "step_time": dt, "images_per_s": pcfg.batch_size / dt}
            if cfg["recipe"] == "cloc":  # model FLOP/s of the whole mesh (encoder/flops.py)
                seen = (
                    host if cfg["mode"] == "cloc" else {k: v for k, v in host.items() if k.startswith("text")}
                )
                row["model_tflops_per_s"] = batch_step_flops(mc, seen) / dt / 1e12
            writer.write(row)
            bar.set_postfix(loss=f"{last['loss']:.3f}")
        bar.update(1)

    try:
        for step in range(start, total):
            host = next(it)
            if step == int(cfg["debug"]["nan_at_step"]):
                host["images"] = np.full_like(host["images"], np.nan)
            batch = shard_batch({k: v for k, v in host.items() if k != "index"}, mesh)
            state, metrics = step_fn(state, batch)
            if pending is not None:
                read(pending)  # the previous step, while this one runs
            pending = (step, metrics, host)
            done = step + 1
            save = done % every == 0 or done == total
            evaluate = (
                eval_records is not None and eval_every > 0 and done % eval_every == 0 and done != total
            )
            if save or evaluate or done == start + 1 or delay > 0:
                read(pending)
                pending = None
            if save:
                meta = {
                    "step": done,
                    "data_step": it.step,
                    "seed": pcfg.seed,
                    "rng": np.asarray(jax.device_get(state.rng)).tolist(),
                    "prep": it.prep_state,  # the floors after this step's batch
                }
                ck.save_state(mgr, done, state.params, state.opt_state, meta)
            if evaluate:
                last_eval = _run_eval(model, state.params, cfg, eval_records, tokenize)
                writer.write({"step": done, **{f"eval/{k}": v for k, v in last_eval.items()}})
            if save or evaluate:
                t_mark = time.perf_counter()  # step_time counts training only
            if delay > 0:
                time.sleep(delay)
        mgr.wait_until_finished()  # the last step saved, so no step is left unread
        if eval_records is not None and cfg["eval"]["at_end"]:
            last_eval = _run_eval(model, state.params, cfg, eval_records, tokenize)
            writer.write({"step": total, **{f"eval/{k}": v for k, v in last_eval.items()}})
    finally:
        it.close()
        bar.close()
        writer.close()
        mgr.wait_until_finished()
        mgr.close()
        problems.log_summary("pretrain data")
    if jax.process_index() == 0:
        plot_metrics(workdir / ck.METRICS_FILE, workdir / "loss.png")
    return {
        "workdir": str(workdir),
        "steps": total,
        "resumed_from": start,
        "warm_start": warm_start,
        "final": last,
        "eval": last_eval,
        "compile_s": compile_s,
        "wall_s": time.perf_counter() - t_start,
        "skipped_images": problems.skipped,
    }


def _recipe(cfg: dict):
    """(recipe module, its Config) for `recipe: rocket | lcl`; None for plain CLIP/CLOC."""
    if cfg["recipe"] == "cloc":
        return None
    from clocmllm.encoder.recipes import lcl, rocket

    mod = {"rocket": rocket, "lcl": lcl}[cfg["recipe"]]
    return mod, mod.Config.from_dict(cfg[cfg["recipe"]] or None, source=f"config {cfg['recipe']}:")


def _recipe_loss(model, cfg: dict, recipe):
    """The recipe's loss_fn (rocket wraps the mode's CLIP/CLOC loss as its global term)."""
    if recipe is None:
        return None
    mod, rcfg = recipe
    if cfg["recipe"] == "rocket":
        return mod.make_loss_fn(model, rcfg, make_loss_fn(model, cfg))
    return mod.make_loss_fn(model, rcfg)


def _eval_records(cfg: dict):
    """Eval split records (None when there is none)."""
    from clocmllm.encoder.input_pipeline import load_records

    d = cfg["data"]
    path = d["eval_path"]
    if path is None:
        base = Path(d["path"])
        if not (base.is_dir() and (base / d["eval_split"]).is_dir()):
            return None
        path = str(base)
    return load_records(path, d["eval_split"])[: int(cfg["eval"]["max_images"])]


def _run_eval(model, params, cfg: dict, records, tokenize) -> dict:
    from clocmllm.encoder.evaluators import evaluate_records

    return evaluate_records(
        model, params, records, tokenize, mode=cfg["mode"], batch_size=int(cfg["eval"]["batch_size"]),
        lcl=(cfg["lcl"] or {}) if cfg["recipe"] == "lcl" else None,  # LCL's own heads (evaluators/lcl.py)
    )  # fmt: skip
