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

Neither recipe imports torch; the numpy-side builders import no jax.
"""
