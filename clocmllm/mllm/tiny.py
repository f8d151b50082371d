"""Microscopic random models and data, built offline: for tests, benchmarks and smoke runs.

Nothing here downloads anything. `make_tower_folder` writes a random `CLIPVisionModel`
folder in the exported-encoder layout (keys re-saved with the `vision_model.` prefix, as the
adapters' exporter does). `make_conversations` draws coloured shapes with PIL and writes a
LLaVA conversation JSON with referring and grounding turns in the world's format.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from clocmllm.boxes import format_box, to_grid

LLM_SIZES = {
    "tiny": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "small": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
}
TOWER_SIZES = {
    "tiny": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    ),
    "small": dict(
        hidden_size=192,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=3,
        image_size=224,
        patch_size=16,
    ),
}


def llm_config(model_type: str = "llama", size: str = "tiny", **overrides) -> dict:
    """Config dict for `build_llm({"config": ...})`: llama or qwen2, untied embeddings."""
    cfg = dict(
        model_type=model_type, vocab_size=1100, max_position_embeddings=1024, tie_word_embeddings=False
    )
    cfg.update(LLM_SIZES[size])
    cfg.update(overrides)
    return cfg


def make_tower_folder(folder: str | Path, size: str = "tiny", seed: int = 0, prompter: bool = False) -> Path:
    """A random CLIPVisionModel folder; with `prompter`, a random CLOC prompter beside it."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    folder = Path(folder)
    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(**TOWER_SIZES[size]))
    model.save_pretrained(folder)
    sd = {}
    for k, v in model.state_dict().items():
        sd[k if k.startswith("vision_model.") else "vision_model." + k] = v.contiguous()
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    if prompter:
        from clocmllm.mllm.prompter import CONFIG_NAME, WEIGHTS_NAME, ClocPrompter, PrompterConfig

        width = model.config.hidden_size
        pcfg = PrompterConfig(width=width, embed_dim=width // 2, heads=1, mlp_dim=2 * width)
        (folder / CONFIG_NAME).write_text(json.dumps(pcfg.to_dict()))
        sd = {k: v.contiguous() for k, v in ClocPrompter(pcfg).state_dict().items()}
        save_file(sd, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    s = model.config.image_size
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "size": {"shortest_edge": s},
                "crop_size": {"height": s, "width": s},
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            }
        )
    )
    return folder


COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


def make_conversations(
    folder: str | Path,
    n: int = 8,
    seed: int = 0,
    size: tuple[int, int] = (96, 64),
    tasks: tuple[str, ...] = ("referring", "grounding"),
) -> Path:
    """`folder/conversations.json` with `n` samples cycling through `tasks`."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    w, h = size
    for i in range(n):
        img = Image.new("RGB", size, (250, 250, 250))
        draw = ImageDraw.Draw(img)
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        bw, bh = rng.randint(12, 30), rng.randint(12, 30)
        x1, y1 = rng.randint(0, w - bw - 1), rng.randint(0, h - bh - 1)
        box = [float(x1), float(y1), float(x1 + bw), float(y1 + bh)]
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        name = f"images/{i:04d}.png"
        img.save(folder / name)
        phrase = f"a {colour} {shape}"
        box_text = format_box(to_grid(box, w, h, size=max(w, h)))  # the world's convention
        if tasks[i % len(tasks)] == "referring":
            conv = [
                {"from": "human", "value": f"<image>\nWhat is the object at {box_text} <region>?"},
                {"from": "gpt", "value": phrase},
            ]
            task = "referring"
        else:
            conv = [
                {"from": "human", "value": f"<image>\nWhere is {phrase}?"},
                {"from": "gpt", "value": box_text},
            ]
            task = "grounding"
        records.append(
            {
                "id": f"s{i}",
                "image": name,
                "conversations": conv,
                "task": task,
                "width": w,
                "height": h,
                "boxes": [box],
            }
        )
    out = folder / "conversations.json"
    out.write_text(json.dumps(records, indent=1))
    return out


def conversation_texts(path: str | Path) -> list[str]:
    """All message texts of a conversation JSON (to build a word-level tokenizer)."""
    data = json.loads(Path(path).read_text())
    return [m["value"] for rec in data for m in rec["conversations"]]
