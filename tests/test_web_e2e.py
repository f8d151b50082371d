"""End to end in headless Chromium: a fine-tuned MLLM behind `clocmllm serve`'s page.

A microscopic MLLM is fine-tuned (stage 2, full LLM) until it has learnt four grounding and
referring answers; the page then uploads one of those images, asks its grounding question,
and the answer's box must be drawn on the canvas where the object is. The screenshot is
saved next to the test's files (and copied to $CLOCMLLM_ARTIFACTS when that is set).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")

from browser import browser_page
from PIL import Image

from clocmllm.boxes import iou
from clocmllm.commands.serve import make_responder
from clocmllm.mllm import tiny
from clocmllm.mllm.config import load_config
from clocmllm.mllm.train import finetune
from clocmllm.web.server import make_server


@pytest.fixture(scope="module")
def grounding_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("web_e2e")
    tower = tiny.make_tower_folder(root / "tower")
    data = tiny.make_conversations(root / "data", n=4, size=(64, 48))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe = {
            "model": {
                "tower": {"path": str(tower)},
                "regions": "shared",
                "llm": {"config": tiny.llm_config("qwen2")},
            },
            "data": {"train": str(data), "max_length": 128},
            "train": {
                "stage": 2,
                "max_steps": 150,
                "lr": 1e-2,
                "batch_size": 4,
                "warmup_ratio": 0.0,
                "output_dir": str(root / "model"),
            },
        }
        (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        cfg = load_config(str(root / "recipe.yaml"), [])
        out = finetune(cfg)
    finally:
        torch.set_num_threads(before)
    return out, data


def test_browser_grounding_question_draws_the_answer_box(grounding_model, tmp_path):
    model_dir, data = grounding_model
    rec = next(r for r in json.loads(data.read_text()) if r["task"] == "grounding")
    question = rec["conversations"][0]["value"].split("\n", 1)[1]
    image_path = data.parent / rec["image"]
    truth = rec["boxes"][0]

    server = make_server(make_responder(str(model_dir), max_new_tokens=16), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    try:
        with browser_page() as page:
            page.goto(f"http://{host}:{port}/")
            page.set_input_files("#file", str(image_path))
            page.wait_for_function("document.getElementById('status').textContent.startsWith('image')")
            page.fill("#prompt", question)
            page.click("#ask")
            page.wait_for_function(
                "Number(document.getElementById('canvas').dataset.answerBoxes) >= 1", timeout=60000
            )
            answer = page.locator("#log .turn").first.inner_text()
            shot = tmp_path / "web_e2e.png"
            page.screenshot(path=str(shot))
            canvas_png = page.locator("#canvas").screenshot()
            scale = page.evaluate("canvas.width / img.width")
    finally:
        server.shutdown()
        server.server_close()
    if os.environ.get("CLOCMLLM_ARTIFACTS"):
        shutil.copy(shot, os.environ["CLOCMLLM_ARTIFACTS"])
    assert shot.stat().st_size > 5000

    # The answer names a box that overlaps the object, and that box is drawn in red there.
    boxes = [[float(v) for v in part.split("]")[0].split(",")] for part in answer.split("[")[1:]]
    assert boxes, f"no box in the answer: {answer!r}"
    pixels = np.asarray(Image.open(io.BytesIO(canvas_png)).convert("RGB")).astype(int)
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
    ys, xs = np.nonzero(red)
    assert len(xs) > 50, "no answer box drawn on the canvas"
    drawn = [xs.min() / scale, ys.min() / scale, (xs.max() + 1) / scale, (ys.max() + 1) / scale]
    assert iou(drawn, truth) > 0.5, (drawn, truth, answer)
