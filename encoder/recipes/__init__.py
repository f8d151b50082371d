"""Extra pretraining recipes as components: clip-rocket (`rocket`) and LCL (`lcl`).

Each recipe is a small set of pieces the CLOC trainer calls; none of them owns a loop.
Interface (the same names in `rocket.py` and `lcl.py`; `R` is the module):

Config
    R.Config.from_dict(section: dict | None, source: str) -> R.Config
        The recipe's YAML section (`rocket:` or `lcl:` in a trainer recipe); unknown keys
        raise ValueError naming `source`.
    R.PARAM_KEY: str
        Top-level key of the recipe's params next to the CLIP params ('rocket' / 'lcl'):
        params = {**clip_params, R.PARAM_KEY: extra}. `split_params(params)` undoes it.

Parameters
    R.init_extra_params(rng, model_config: ModelConfig, recipe_config) -> dict
        The recipe's own params subtree (rocket: image/text MLP projectors + their own
        logit_scale; LCL: the causal LM, its image-token projection, the attentive pooler,
        the contrastive heads and their logit_scale). Trained from scratch.

Data (numpy side, no jax)
    rocket.RocketDataset(base: RegionDataset, recipe_config, tokenize)
        Wraps the input pipeline's dataset; `.batch(step, pool)` returns the base batch plus
        aug_images f32 [b,n,S,S,3], aug_text i32 [b,n,T], aug_region_boxes f32 [b,n,M,4],
        aug_region_valid bool [b,n,M]. Same `.cfg`/`.problems`, so BatchIterator(wrapped)
        works unchanged; still a pure function of (seed, step).
    lcl.LCLDataset(docs, recipe_config, encode, image_size, batch_size, seed, ...)
        `.batch(step, pool)` -> lm_ids, lm_image_pos, lm_loss_mask, images, image_valid,
        image_start, image_contrast (see `lcl.build_lcl_batch`).

Loss (jax side)
    R.make_loss_fn(model, recipe_config, ...) -> loss_fn(params, batch) -> (loss, metrics)
        Same signature as the trainer's own `make_loss_fn(model, cfg)` result, so the step
        function is unchanged. rocket takes the trainer's CLIP/CLOC loss_fn as
        `base_loss_fn` (the weak-view global term); LCL needs none.

Trainer wiring (as `encoder/trainer.py` does it; `recipe:` in a trainer config):
1. DEFAULTS gains `"recipe": "cloc"` (cloc | rocket | lcl), `"rocket": {}`, `"lcl": {}`;
   `_check_keys` must not descend into `rocket`/`lcl` (their Config.from_dict validates),
   and `incompatible_keys` compares `recipe` like `mode`.
2. Params: after `model.init`, `params[R.PARAM_KEY] = R.init_extra_params(key, mc, rcfg)`
   inside `abstract_state`'s `init` (so eval_shape, shardings and orbax see the subtree).
3. Loss: `make_train_step` takes the loss_fn instead of building it:
   rocket: `rocket.make_loss_fn(model, rcfg, make_loss_fn(model, cfg))`;
   lcl:    `lcl.make_loss_fn(model, lcfg)`.
4. Data: rocket: `dataset = rocket.RocketDataset(RegionDataset(...), rcfg, tokenize)`;
   lcl: `docs = paired_to_interleaved(((r.image_path, r.caption) for r in records), seed,
   image_first_p=lcfg.image_first_p)` (or `read_interleaved_jsonl` for interleaved data),
   `dataset = lcl.LCLDataset(docs, lcfg, mc, lcl.tokenizer_encode(tok), batch_size, seed,
   problems, threads, prefetch, jax.process_index(), jax.process_count())`.
   Both work with `BatchIterator` unchanged; drop `index` as today before `shard_batch`.
5. Export: the adapters export `visual/` (and the prompter); the `rocket`/`lcl` subtrees are
   pretraining-only heads and are not exported.
6. Evaluation: rocket checkpoints evaluate as their `mode`; LCL ones get their image-text
   figures from LCL's own z / LM-state heads (`encoder/evaluators/lcl.py`), since LCL leaves
   the CLIP text tower untrained.

Neither recipe imports torch; the numpy-side builders import no jax.
"""
