"""Fine-tuning: `finetune(config)`, single process, accelerate DDP, or DeepSpeed ZeRO-2/3.

Stages (LLaVA-1.5's recipe):
- stage 1: only the connector(s) train; LLM and tower frozen.
- stage 2: connector(s) + LLM (full, or LoRA via peft when `train.lora` is set); the tower
  trains only with `model.tower.trainable: true`.

The same code runs under `python`, `accelerate launch --multi_gpu --num_processes 2` (DDP, gloo
on CPU) and `torchrun`/`deepspeed` with `train.deepspeed: scripts/deepspeed/zero2.json`.
`batch_size` is per process; the global batch is batch_size x processes x grad_accum.
The LR schedule is linear warm-up then cosine, stepped once per optimizer step (not prepared
by accelerate, whose scheduler wrapper would step it once per process).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from clocmllm.mllm.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from clocmllm.mllm.dataset import ConversationDataset, collate
from clocmllm.mllm.model import MllmConfig, build_model
from clocmllm.mllm.save import load_model, save_model
from clocmllm.mllm.token_weights import weight_table, weighted_loss
from clocmllm.mllm.tokenizer import build_tokenizer, ensure_special_tokens

log = logging.getLogger("clocmllm.mllm")


class EpochSampler(torch.utils.data.Sampler):
    """A fixed permutation per (seed, epoch): resumable and identical on every process.

    Deliberately no `set_epoch`: accelerate's loader calls `set_epoch(its own pass count)` on
    samplers that have one, and after a resume that count is not the training epoch.
    """

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _tokenizer(cfg: dict):
    from transformers import AutoTokenizer

    path = cfg["model"]["tokenizer"].get("path")
    if path:
        tok = AutoTokenizer.from_pretrained(path)
        ensure_special_tokens(tok)
        return tok
    texts = [
        m["value"] for rec in json.loads(Path(cfg["data"]["train"]).read_text()) for m in rec["conversations"]
    ]
    return build_tokenizer(texts)


def _build(cfg: dict):
    mc = cfg["model"]
    if mc.get("init_from"):
        model, tok = load_model(mc["init_from"])
        if mc.get("proposer") and model.proposer is None:
            raise ValueError(
                f"model.proposer: {mc['init_from']} (model.init_from) has no proposer, and a model's "
                "architecture comes from its init_from folder: give model.proposer in stage 1 instead"
            )
        model.tower.set_trainable(bool(mc["tower"].get("trainable", False)))
        model.train()
        return model, tok
    tok = _tokenizer(cfg)
    config = MllmConfig(
        tower=dict(mc["tower"]),
        connector=mc["connector"],
        connector_pos=mc.get("connector_pos", "none"),
        image_position=mc.get("image_position", "first"),
        candidate_position=mc.get("candidate_position", "after_image"),
        candidate_pointer=bool(mc.get("candidate_pointer", True)),
        regions=mc["regions"],
        template=mc["template"],
        llm=mc["llm"],
    )
    trained = None
    if mc.get("proposer"):
        from clocmllm.mllm.proposer import BoxProposer

        trained = BoxProposer.from_folder(mc["proposer"])
        config.proposer = trained.config.to_dict()
    model = build_model(config, tok)
    if trained is not None:
        model.proposer.load_state_dict(trained.state_dict())
    return model, tok


def _freeze(model, cfg: dict) -> None:
    tc = cfg["train"]
    model.llm.requires_grad_(tc["stage"] == 2 and not tc["lora"])
    model.tower.set_trainable(tc["stage"] == 2 and bool(cfg["model"]["tower"].get("trainable", False)))
    model.projector.requires_grad_(True)
    if model.patch_position is not None:
        model.patch_position.requires_grad_(True)
    if model.region_projector is not None:
        model.region_projector.requires_grad_(True)
    if tc["stage"] == 2 and tc["lora"]:
        from peft import LoraConfig, get_peft_model

        lc = tc["lora"]
        model.llm = get_peft_model(
            model.llm,
            LoraConfig(
                task_type="CAUSAL_LM",
                r=int(lc.get("r", 8)),
                lora_alpha=int(lc.get("alpha", 16)),
                lora_dropout=float(lc.get("dropout", 0.05)),
                target_modules=lc.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"]),
            ),
        )


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def deepspeed_config(
    path: str | Path, hidden_size: int, micro_batch: int, grad_accum: int, max_grad_norm: float = 1.0
) -> dict:
    """The JSON with the batch and size "auto" values filled as the HF Trainer fills them.

    Accelerate reads sizes from `model.config.hidden_size`, which a composite model has not,
    and under a plain `torchrun` launch it counts one process for `train_batch_size`; the world
    size comes from the launcher's `WORLD_SIZE` here.
    """
    import os

    ds = json.loads(Path(path).read_text())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world,
    }
    batch["gradient_clipping"] = max_grad_norm
    for key, value in batch.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    zero = ds.get("zero_optimization", {})
    sizes = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    return ds


def _accelerator(tc: dict, hidden_size: int):
    """An Accelerator that is really distributed on CPU too.

    Without CUDA, accelerate only forms a process group when told `cpu=True` (DDP over gloo);
    for DeepSpeed on CPU it needs the gloo backend named up front and ACCELERATE_USE_DEEPSPEED,
    otherwise every rank silently trains alone as "process 0 of 1".
    """
    import os

    from accelerate import Accelerator, DeepSpeedPlugin, PartialState
    from accelerate.utils import DistributedDataParallelKwargs

    kwargs = {"gradient_accumulation_steps": tc["grad_accum"], "mixed_precision": tc["mixed_precision"]}
    on_cpu = not torch.cuda.is_available()
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    if tc["deepspeed"]:
        if not launched:
            raise ValueError("train.deepspeed needs a launcher: deepspeed, torchrun or accelerate launch")
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        if on_cpu:
            PartialState(backend="gloo")
        ds = deepspeed_config(
            tc["deepspeed"], hidden_size, tc["batch_size"], tc["grad_accum"], tc["max_grad_norm"]
        )
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(
            hf_ds_config=ds, gradient_clipping=ds["gradient_clipping"]
        )
    else:
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
        kwargs["cpu"] = on_cpu
    return Accelerator(**kwargs)


def finetune(cfg: dict) -> Path:
    """Train per `cfg` (see `clocmllm.mllm.config.DEFAULTS`). Returns the saved model folder."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    tc = cfg["train"]
    out = Path(tc["output_dir"])
    set_seed(tc["seed"])
    model, tok = _build(cfg)
    # after the model: the DeepSpeed "auto" sizes need its width (tiny models: no zero.Init needed)
    acc = _accelerator(tc, model.llm.get_input_embeddings().embedding_dim)
    _freeze(model, cfg)
    if tc["gradient_checkpointing"]:
        model.enable_gradient_checkpointing()
    data = ConversationDataset(
        cfg["data"]["train"],
        tok,
        model.tower,
        template=model.config.template,
        max_length=cfg["data"]["max_length"],
        image_position=model.config.image_position,
        proposer=model.proposer,
        candidate_position=model.config.candidate_position,
        dual_grounding=cfg["data"].get("dual_grounding"),
    )
    sampler = EpochSampler(len(data), tc["seed"], tc["shuffle"])
    loader = torch.utils.data.DataLoader(
        data, batch_size=tc["batch_size"], sampler=sampler, collate_fn=lambda b: collate(b, tok.pad_token_id)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    steps_per_epoch = max(1, math.ceil(len(loader) / acc.num_processes / tc["grad_accum"]))
    total = int(tc["max_steps"] or steps_per_epoch * tc["epochs"])
    epochs = math.ceil(total / steps_per_epoch)
    ds_optimizer = bool(tc["deepspeed"]) and "optimizer" in json.loads(Path(tc["deepspeed"]).read_text())
    if ds_optimizer:  # DeepSpeed builds its own (torch_adam on CPU) from the JSON
        from accelerate.utils import DummyOptim

        opt = DummyOptim(params, lr=tc["lr"], weight_decay=tc["weight_decay"])
    elif tc["optimizer"] == "sgd":
        opt = torch.optim.SGD(params, lr=tc["lr"], weight_decay=tc["weight_decay"])
    else:
        opt = torch.optim.AdamW(params, lr=tc["lr"], weight_decay=tc["weight_decay"], betas=(0.9, 0.999))
    token_table = weight_table(tok, tc["token_loss_weights"]) if tc.get("token_loss_weights") else None
    model, opt, loader = acc.prepare(model, opt, loader)
    lr_at = _lr_lambda(total, int(tc["warmup_ratio"] * total))
    inner = opt.optimizer if hasattr(opt, "optimizer") else opt

    def set_lr(step_: int) -> float:
        lr = tc["lr"] * lr_at(step_)
        for group in inner.param_groups:
            group["lr"] = lr
        return lr

    step, start_epoch, skip = 0, 0, 0
    ckpt_root = out / "checkpoints"
    if tc["resume"] and (ck := latest_checkpoint(ckpt_root)) is not None:
        if tc["deepspeed"]:
            acc.load_state(str(ck))
            state = json.loads((ck / "state.json").read_text())
        else:
            state = load_checkpoint(ck, acc.unwrap_model(model), inner)
        step, start_epoch, skip = state["step"], state["epoch"], state["batches_in_epoch"]
        acc.print(f"resumed from {ck} at step {step}")
    lr_now = set_lr(step)

    metrics = out / "metrics.jsonl"
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if step == 0:
            metrics.unlink(missing_ok=True)  # a fresh run starts a fresh log
        (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        acc.print(f"trainable parameters: {n_train:,}; {total} steps; data {data.stats}")
    bar = tqdm(total=total, initial=step, disable=not acc.is_main_process, desc=f"stage {tc['stage']}")
    model.train()
    t0 = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        if step >= total:
            break
        sampler.use_epoch(epoch)
        batches = acc.skip_first_batches(loader, skip) if skip else loader
        done_in_epoch = skip
        skip = 0
        for batch in batches:
            with acc.accumulate(model):
                if token_table is None:
                    loss = model(**batch).loss
                else:
                    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                    loss = weighted_loss(logits, batch["labels"], token_table)
                acc.backward(loss)
                if tc["max_grad_norm"] and acc.sync_gradients and not tc["deepspeed"]:
                    acc.clip_grad_norm_(params, tc["max_grad_norm"])
                opt.step()
                opt.zero_grad()
            done_in_epoch += 1
            if not acc.sync_gradients:
                continue
            used_lr = lr_now
            step += 1
            lr_now = set_lr(step)
            bar.update(1)
            if step % tc["log_every"] == 0 or step == total:
                mean_loss = acc.gather(loss.detach().float().reshape(1)).mean().item()
                if acc.is_main_process:
                    rec = {
                        "step": step,
                        "epoch": epoch,
                        "loss": mean_loss,
                        "lr": used_lr,
                        "elapsed_s": round(time.perf_counter() - t0, 3),
                    }
                    with metrics.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
            if tc["save_every"] and step % tc["save_every"] == 0 and step < total:
                _save_ckpt(acc, model, opt, ckpt_root / f"step_{step}", step, epoch, done_in_epoch, tc)
            if step >= total:
                break
    bar.close()
    final = out / "model"
    _save_final(acc, model, tok, final, tc)
    if acc.is_main_process and tc["plot"] and metrics.is_file():
        plot_loss(metrics, out / "loss.png")
    acc.wait_for_everyone()
    acc.end_training()
    return final


def _save_ckpt(acc, model, opt, folder: Path, step: int, epoch: int, batches: int, tc: dict) -> None:
    state = {"step": step, "epoch": epoch, "batches_in_epoch": batches}
    if tc["deepspeed"]:
        acc.save_state(str(folder))
        if acc.is_main_process:
            (folder / "state.json").write_text(json.dumps(state))
    elif acc.is_main_process:
        save_checkpoint(
            folder, acc.unwrap_model(model), opt.optimizer if hasattr(opt, "optimizer") else opt, state
        )
    acc.wait_for_everyone()


def _save_final(acc, model, tok, folder: Path, tc: dict) -> None:
    acc.wait_for_everyone()
    unwrapped = acc.unwrap_model(model)
    zero3 = bool(tc["deepspeed"]) and acc.state.deepspeed_plugin.zero_stage == 3
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(unwrapped.parameters()), modifier_rank=None):
            if acc.is_main_process:
                save_model(unwrapped, tok, folder)
    elif acc.is_main_process:
        save_model(unwrapped, tok, folder)
    acc.wait_for_everyone()


def plot_loss(metrics: Path, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(metrics.parent.name)
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)
    return png
