"""MLLM training end to end: stage 1 -> stage 2 -> save -> load -> generate/evaluate; resume; LoRA."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import yaml

pytest.importorskip("peft")

from safetensors.torch import load_file

from clocmllm.cli import main as cli_main
from clocmllm.mllm import tiny
from clocmllm.mllm.config import load_config
from clocmllm.mllm.evaluate import evaluate
from clocmllm.mllm.inference import ChatSession
from clocmllm.mllm.save import load_model
from clocmllm.mllm.train import finetune

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mllm_train")
    tower = tiny.make_tower_folder(root / "tower")
    data = tiny.make_conversations(root / "data", n=4, size=(64, 48))
    return root, tower, data


def _recipe(root, tower, data, **train) -> dict:
    return {
        "model": {
            "tower": {"path": str(tower)},
            "regions": "shared",
            "llm": {"config": tiny.llm_config("qwen2")},
        },
        "data": {"train": str(data), "max_length": 128},
        "train": {"batch_size": 4, "lr": 3e-3, "warmup_ratio": 0.0, "plot": True, **train},
    }


def test_stage1_then_stage2_then_generate(setup, capsys):
    root, tower, data = setup
    recipe = root / "stage1.yaml"
    recipe.write_text(
        yaml.safe_dump(_recipe(root, tower, data, stage=1, max_steps=2, output_dir=str(root / "s1")))
    )
    assert cli_main(["finetune", "--config", str(recipe)]) == 0
    s1 = root / "s1" / "model"
    # stage 1 trains the connector only: the LLM stays at its (seeded) initialisation
    from accelerate.utils import set_seed

    from clocmllm.mllm.model import MllmConfig, build_model

    m1, tok = load_model(s1)
    set_seed(0)
    fresh = build_model(
        MllmConfig(
            tower={"path": str(tower)},
            regions="shared",
            template="v1",
            llm={"config": tiny.llm_config("qwen2")},
        ),
        tok,
    )
    for name, p in fresh.llm.state_dict().items():
        torch.testing.assert_close(m1.llm.state_dict()[name], p, msg=name)
    assert (m1.projector[0].weight - fresh.projector[0].weight).abs().max() > 1e-4

    # stage 2 from the stage-1 folder, full LLM, until it has learnt the four answers
    cfg = load_config(
        None,
        [
            f"data.train={data}",
            f"model.init_from={s1}",
            "train.stage=2",
            "train.max_steps=150",
            "train.lr=1e-2",
            "train.batch_size=4",
            "train.warmup_ratio=0",
            f"train.output_dir={root / 's2'}",
        ],
    )
    out = finetune(cfg)
    losses = [json.loads(line)["loss"] for line in (root / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 150 and losses[-1] < 0.05 * losses[0]
    assert (root / "s2" / "loss.png").stat().st_size > 1000

    model, tok = load_model(out)
    result = evaluate(model, tok, data, max_new_tokens=16, progress=False)
    assert result["grounding"] == 2 and result["referring"] == 2
    assert result["grounding_unparsable"] == 0
    assert result["grounding_acc50"] == 1.0 and result["referring_acc"] == 1.0

    # box format round trip through the chat path: pixel box in -> grid text -> pixel box out
    rec = json.loads(data.read_text())[1]
    from PIL import Image

    image = Image.open(data.parent / rec["image"]).convert("RGB")
    streamed: list[str] = []
    ans = ChatSession(model, tok, image, max_new_tokens=16).ask(
        rec["conversations"][0]["value"].split("\n", 1)[1], stream=streamed.append
    )
    assert "".join(streamed).strip() == ans.text
    from clocmllm.boxes import iou

    assert iou(ans.pixel_boxes[0], rec["boxes"][0]) > 0.9
    no_cache = ChatSession(model, tok, image, max_new_tokens=16, use_cache=False).ask(
        rec["conversations"][0]["value"].split("\n", 1)[1]
    )
    assert no_cache.text == ans.text

    # the CLI one-shot draws the answer's box
    png = root / "answer.png"
    prompt = rec["conversations"][0]["value"].split("\n", 1)[1]
    assert (
        cli_main(
            [
                "chat",
                "--model",
                str(out),
                "--image",
                str(data.parent / rec["image"]),
                "--prompt",
                prompt,
                "--max-new-tokens",
                "16",
                "--out",
                str(png),
            ]
        )
        == 0
    )
    assert f"drawn: {png}" in capsys.readouterr().out and png.stat().st_size > 100


def test_resume_gives_the_uninterrupted_result(setup):
    root, tower, data = setup
    base = _recipe(root, tower, data, stage=2, max_steps=4, save_every=2, optimizer="adamw", batch_size=2)
    full = finetune(load_config_dict(base, root / "full"))
    # the interrupted run: keep only its step-2 checkpoint, then run again
    part_dir = root / "part"
    finetune(load_config_dict(base, part_dir))
    import shutil

    shutil.rmtree(part_dir / "model")
    shutil.rmtree(part_dir / "checkpoints" / "step_4", ignore_errors=True)
    assert (part_dir / "checkpoints" / "step_2" / "optimizer.safetensors").is_file()
    resumed = finetune(load_config_dict(base, part_dir))
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    steps = [json.loads(line)["step"] for line in (part_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [3, 4]


def load_config_dict(recipe: dict, out_dir) -> dict:
    from clocmllm.mllm.config import DEFAULTS, merge

    cfg = merge(DEFAULTS, recipe)
    cfg["train"]["output_dir"] = str(out_dir)
    return cfg


def test_lora_merge_keeps_outputs_and_saves_stock(setup, tmp_path):
    from peft import LoraConfig, get_peft_model

    from clocmllm.mllm.dataset import ConversationDataset, collate
    from clocmllm.mllm.model import MllmConfig, build_model
    from clocmllm.mllm.save import save_model
    from clocmllm.mllm.tokenizer import build_tokenizer

    _, tower, data = setup
    tok = build_tokenizer(tiny.conversation_texts(data))
    torch.manual_seed(0)
    model = build_model(
        MllmConfig(tower={"path": str(tower)}, regions="none", llm={"config": tiny.llm_config()}), tok
    )
    model.llm = get_peft_model(model.llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.llm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a LoRA that changes the outputs
    model.eval()
    batch = collate(
        [ConversationDataset(data, tok, model.tower, template="v1")[i] for i in (1, 3)], tok.pad_token_id
    )
    batch.pop("labels")
    with torch.no_grad():
        before = model(**batch).logits
        base = model.llm.get_base_model()
        with model.llm.disable_adapter():
            plain = model(**batch).logits
    assert (before - plain).abs().max() > 1e-3
    assert save_model(model, tok, tmp_path / "m") == "stock"
    loaded, _ = load_model(tmp_path / "m")
    assert not any("lora" in k for k in load_file(tmp_path / "m" / "model.safetensors"))
    with torch.no_grad():
        after = loaded(**batch).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    del base


def test_lora_with_gradient_checkpointing_through_finetune(setup):
    root, tower, data = setup
    recipe = _recipe(
        root,
        tower,
        data,
        stage=2,
        max_steps=2,
        gradient_checkpointing=True,
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    )
    recipe["model"]["regions"] = "none"
    recipe["model"]["tower"]["trainable"] = True
    out = finetune(load_config_dict(recipe, root / "lora"))
    # merged on save: a stock folder without LoRA tensors, and the tower moved (it trained)
    assert json.loads((out / "clocmllm_mllm.json").read_text())["kind"] == "stock"
    weights = load_file(out / "model.safetensors")
    assert not any("lora" in k for k in weights)
    start = load_file(tower / "model.safetensors")
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert (weights["vision_tower." + key] - start[key]).abs().max() > 0


def test_config_sets_and_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {train: x.json}\nmodel: {tower: {path: t}}\ntrain: {lr: 3e-3}\n")
    cfg = load_config(recipe, ["train.batch_size=8", "model.tower.layer=-1", "train.lora={r: 4}"])
    assert cfg["train"]["lr"] == 3e-3 and cfg["train"]["batch_size"] == 8
    assert cfg["model"]["tower"]["layer"] == -1 and cfg["model"]["tower"]["feature"] == "patch"
    assert cfg["train"]["lora"] == {"r": 4}
    with pytest.raises(ValueError, match="train.lr"):
        load_config(recipe, ["train.lr=fast"])
    with pytest.raises(ValueError, match="unknown top-level"):
        recipe.write_text("data: {train: x}\nmodel: {tower: {path: t}}\ntrian: {}\n")
        load_config(recipe)
    with pytest.raises(ValueError, match="data.train"):
        load_config(None, ["model.tower.path=t"])
