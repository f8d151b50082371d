"""The web chat page and server, with a geometric responder standing in for the model.

The responder here answers from the request alone (it returns the user's box, or a fixed
box when there is none), so this test checks the page and the HTTP layer: upload, box
drawing, the request the page sends, and that answer boxes get drawn. The end-to-end test
with a fine-tuned MLLM behind the page is in tests/test_web_e2e.py.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from browser import browser_page
from PIL import Image

from clocmllm.web.server import ChatRequestError, make_server, parse_chat_request


def _png_bytes(w=64, h=48, colour=(30, 160, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, "PNG")
    return buf.getvalue()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.fixture()
def server():
    calls = []

    def responder(image, prompt, box):
        calls.append((image.size, prompt, box))
        out = box if box is not None else [8.0, 6.0, 40.0, 30.0]
        return f"it is at {out}", [out]

    srv = make_server(responder, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, calls
    srv.shutdown()
    srv.server_close()


def _post(url, obj):
    req = urllib.request.Request(url, json.dumps(obj).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_server_binds_loopback_and_validates(server):
    srv, calls = server
    host, port = srv.server_address[:2]
    assert host == "127.0.0.1"
    url = f"http://{host}:{port}/api/chat"
    status, out = _post(url, {"image": _data_url(_png_bytes()), "prompt": "where?", "box": [1, 2, 30, 20]})
    assert status == 200 and out["boxes"] == [[1.0, 2.0, 30.0, 20.0]] and out["width"] == 64
    assert calls[-1] == ((64, 48), "where?", [1.0, 2.0, 30.0, 20.0])
    status, out = _post(url, {"image": _data_url(_png_bytes()), "prompt": "x", "box": [1, 2, 300, 20]})
    assert status == 400 and out["error"].startswith("box:")
    status, out = _post(url, {"image": "data:image/png;base64,AAAA", "prompt": "x"})
    assert status == 400 and out["error"].startswith("image:")
    status, out = _post(url, {"image": _data_url(_png_bytes()), "prompt": "  "})
    assert status == 400 and out["error"].startswith("prompt:")


def test_parse_chat_request_rejects_non_json():
    with pytest.raises(ChatRequestError, match="not JSON"):
        parse_chat_request(b"{nope")


def test_page_draws_user_and_answer_boxes(server, tmp_path):
    srv, calls = server
    host, port = srv.server_address[:2]
    img_path = tmp_path / "green.png"
    img_path.write_bytes(_png_bytes())
    with browser_page() as page:
        page.goto(f"http://{host}:{port}/")
        page.set_input_files("#file", str(img_path))
        page.wait_for_function("document.getElementById('status').textContent.startsWith('image 64')")
        # Drag a box on the canvas (the page scales 64x48 up by 8 → 512x384).
        c = page.locator("#canvas").bounding_box()
        page.mouse.move(c["x"] + 16, c["y"] + 16)
        page.mouse.down()
        page.mouse.move(c["x"] + 200, c["y"] + 160, steps=5)
        page.mouse.up()
        typed = [float(v) for v in page.input_value("#box").split(",")]
        assert typed == pytest.approx([2, 2, 25, 20], abs=1)
        page.fill("#prompt", "What is the object in the box?")
        page.click("#ask")
        page.wait_for_function("document.getElementById('canvas').dataset.answerBoxes === '1'", timeout=10000)
        page.screenshot(path=str(tmp_path / "page.png"))
        pixels = np.asarray(
            Image.open(io.BytesIO(page.locator("#canvas").screenshot())).convert("RGB")
        ).astype(int)
    assert calls and calls[-1][2] == pytest.approx(typed, abs=0.6)
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 100) & (pixels[..., 2] < 100)
    assert red.sum() > 100, "the answer box was not drawn in red on the canvas"
