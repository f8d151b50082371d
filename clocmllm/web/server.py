"""A small web chat on 127.0.0.1: upload an image, draw or type a box, ask; answers show boxes.

Why not Gradio (which LLaVA and Ferret use): it brings ~60 dependencies and a front-end
bundle we would pin and test across its frequent breaking releases, for one page with a
canvas and a text box. The standard library's ThreadingHTTPServer plus one static page
serves the same job offline, starts instantly, and is driven by a browser test directly.

The server knows nothing of models: it calls a `Responder`,
`(image: PIL.Image, prompt: str, box_px: list[float] | None) -> (answer, boxes_px)`,
which `clocmllm serve` builds from a fine-tuned MLLM folder.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from clocmllm.boxes import box_problem

log = logging.getLogger("clocmllm.web")

Responder = Callable[[Image.Image, str, "list[float] | None"], "tuple[str, list[list[float]]]"]

PAGE = Path(__file__).with_name("index.html")
MAX_UPLOAD_BYTES = 20 * 1024 * 1024


class ChatRequestError(ValueError):
    """A request the page should show to the user, with the field that is wrong."""


def parse_chat_request(body: bytes) -> tuple[Image.Image, str, list[float] | None]:
    """Decode the page's JSON: {image: data URL, prompt: str, box: [x1,y1,x2,y2] | null}."""
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as err:
        raise ChatRequestError(f"request body is not JSON: {err}") from err
    if not isinstance(payload, dict):
        raise ChatRequestError("request body must be a JSON object")
    data_url = payload.get("image")
    if not isinstance(data_url, str) or "," not in data_url:
        raise ChatRequestError("image: expected a data URL (upload an image first)")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")
    except (ValueError, UnidentifiedImageError, OSError) as err:
        raise ChatRequestError(f"image: cannot decode the uploaded file ({err})") from err
    prompt = payload.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ChatRequestError("prompt: empty question")
    box = payload.get("box")
    if box is not None:
        why = box_problem(box, image.width, image.height)
        if why:
            raise ChatRequestError(f"box: {why}")
        box = [float(c) for c in box]
    return image, prompt.strip(), box


class _Handler(BaseHTTPRequestHandler):
    responder: Responder
    lock: threading.Lock

    def log_message(self, fmt: str, *args) -> None:  # route access logs to logging, not stderr
        log.info("%s - " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif self.path == "/healthz":
            self._json(HTTPStatus.OK, {"ok": True})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/api/chat":
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {self.path}"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0 or length > MAX_UPLOAD_BYTES:
            self._json(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"upload must be 1 B to {MAX_UPLOAD_BYTES} B"}
            )
            return
        try:
            image, prompt, box = parse_chat_request(self.rfile.read(length))
        except ChatRequestError as err:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
            return
        try:
            with self.lock:  # one generation at a time: the model is not re-entrant
                answer, boxes = self.responder(image, prompt, box)
        except Exception as err:  # report to the page, keep serving
            log.exception("responder failed")
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"model failed: {err}"})
            return
        self._json(
            HTTPStatus.OK,
            {
                "answer": answer,
                "boxes": [[float(c) for c in b] for b in boxes],
                "width": image.width,
                "height": image.height,
            },
        )


def make_server(responder: Responder, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """A ready server (port 0 picks a free one: read `server.server_address`)."""
    handler = type(
        "ChatHandler", (_Handler,), {"responder": staticmethod(responder), "lock": threading.Lock()}
    )
    return ThreadingHTTPServer((host, port), handler)


def serve_forever(responder: Responder, host: str = "127.0.0.1", port: int = 7860) -> None:
    server = make_server(responder, host, port)
    h, p = server.server_address[:2]
    print(f"clocmllm web chat on http://{h}:{p}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
