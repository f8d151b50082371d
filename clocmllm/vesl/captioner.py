"""VESL step 1: a caption for each image. Three interchangeable captioners, one protocol.

A captioner is anything with `__call__(images: list[PIL.Image]) -> list[str]` (one caption an
image, in order). `captioner_from(...)` turns what the user has into one:
- a local Hugging Face image-to-text folder (BLIP, Florence-2, ...) -> `HFCaptioner` (batched);
- any `Callable[[PIL.Image], str]`, e.g. our MLLM's chat function -> `CallableCaptioner`;
- existing captions (`--captions FILE`, JSONL of `{image, caption}`) -> `CaptionTable`, looked up
  by item rather than called on pixels (the pipeline asks it first).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from PIL import Image

from clocmllm.data.jsonl import iter_json_lines
from clocmllm.data.problems import DataError, Problem, ProblemLog


@runtime_checkable
class Captioner(Protocol):
    def __call__(self, images: list[Image.Image]) -> list[str]: ...


class CallableCaptioner:
    """Wraps a one-image function (e.g. `clocmllm.mllm` chat with a "describe" prompt). The whole
    call is counted as model time: the function is the model, seen from the pipeline."""

    def __init__(self, fn: Callable[[Image.Image], str]):
        self.fn = fn
        self.model_seconds = 0.0

    def __call__(self, images: list[Image.Image]) -> list[str]:
        import time

        t0 = time.perf_counter()
        try:
            return [str(self.fn(img)) for img in images]
        finally:
            self.model_seconds += time.perf_counter() - t0


class HFCaptioner:
    """A local image-to-text model through `AutoProcessor` + the matching generation class.

    `prompt` is passed as text when given (Florence-2 wants a task token such as
    "<MORE_DETAILED_CAPTION>"; BLIP takes an optional prefix such as "a picture of"); a prompt that
    the decoded text starts with is cut off. Greedy decoding: labels should be reproducible.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        prompt: str | None = None,
        max_new_tokens: int = 60,
        device: str = "cpu",
        trust_remote_code: bool = False,
    ):
        import transformers as tf

        folder = str(folder)
        self.processor = tf.AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
        config = tf.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        self.model = self._load_model(tf, folder, config, trust_remote_code).to(device).eval()
        self.prompt, self.max_new_tokens, self.device = prompt, max_new_tokens, device
        self.model_seconds = 0.0

    @staticmethod
    def _load_model(tf, folder: str, config, trust_remote_code: bool):
        if config.model_type == "blip":
            return tf.BlipForConditionalGeneration.from_pretrained(folder)
        errors = []
        for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
            cls = getattr(tf, name, None)
            if cls is None:
                continue
            try:
                return cls.from_pretrained(folder, trust_remote_code=trust_remote_code)
            except (ValueError, KeyError) as err:
                errors.append(f"{name}: {err}")
        raise ValueError(f"{folder}: not an image-to-text model transformers can load ({'; '.join(errors)})")

    def __call__(self, images: list[Image.Image]) -> list[str]:
        import time

        import torch

        kwargs = {"images": images, "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(images)
        inputs = self.processor(**kwargs).to(self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        self.model_seconds += time.perf_counter() - t0
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        out = []
        for t in texts:
            t = t.strip()
            if self.prompt and t.lower().startswith(self.prompt.lower()):
                t = t[len(self.prompt) :].strip()
            out.append(t)
        return out


class CaptionTable:
    """Captions given up front (`--captions FILE`): JSONL of `{"image": PATH, "caption": TEXT}`.

    An item is matched by its key (the path relative to `--images`, or the list's string) or by
    absolute path, with relative paths in the file taken relative to the file's folder.
    """

    def __init__(self, captions: dict[str, str]):
        self.captions = captions

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike) -> CaptionTable:
        path = Path(path)
        root = path.resolve().parent
        table: dict[str, str] = {}
        for lineno, obj in iter_json_lines(path, ProblemLog(strict=True)):
            image, caption = (obj.get("image"), obj.get("caption")) if isinstance(obj, dict) else (None, None)
            if not isinstance(image, str) or not image:
                raise DataError(Problem(str(path), lineno, "image", "missing or empty image path"))
            if not isinstance(caption, str):
                raise DataError(Problem(str(path), lineno, "caption", "caption must be a string"))
            table[image] = caption
            table[os.path.normpath(os.path.join(root, image))] = caption
        return cls(table)

    def get(self, key: str, path: str | None) -> str | None:
        if key in self.captions:
            return self.captions[key]
        if path is not None:
            return self.captions.get(os.path.normpath(os.path.abspath(path)))
        return None


def captioner_from(spec, **kwargs) -> Captioner | None:
    """None, a folder path (-> HFCaptioner), a batched captioner, or a one-image callable.

    A plain callable is taken to caption one image at a time; a custom batched captioner (list of
    images in, list of captions out) marks itself with a `batched = True` attribute.
    """
    if spec is None:
        return None
    if isinstance(spec, (str, os.PathLike)):
        return HFCaptioner(spec, **kwargs)
    if isinstance(spec, (HFCaptioner, CallableCaptioner)) or getattr(spec, "batched", False):
        return spec
    if callable(spec):
        return CallableCaptioner(spec)
    raise TypeError(
        f"captioner must be a folder, a batched captioner or a callable, got {type(spec).__name__}"
    )
