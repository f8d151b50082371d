"""A randomly initialised OWLv2 / OWL-ViT folder built offline, for tests, benchmarks and the demo.

Nothing is downloaded: the model comes from an `Owlv2Config`, and the processor's CLIP BPE tokenizer
from a `vocab.json` + `merges.txt` written here (every byte as a token, with and without the
word-end marker `</w>`, and a few merges). The folder loads back with `from_pretrained` exactly like
a real OWLv2 checkpoint, so the labeller runs its real code path on it. Its boxes are random.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Common letter pairs merged into one token, so the tokenizer exercises real BPE merges.
_MERGES = ["t h", "e r", "i n", "a n", "o n", "r e", "th e</w>", "e d</w>"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_clip_bpe(folder: str | os.PathLike) -> tuple[Path, Path]:
    """Write a tiny CLIP-style `vocab.json` + `merges.txt`; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    for merge in _MERGES:
        tokens.append(merge.replace(" ", ""))
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def build_random_owl(
    folder: str | os.PathLike,
    *,
    kind: str = "owlv2",
    image_size: int = 64,
    patch_size: int = 16,
    vision_width: int = 32,
    vision_layers: int = 1,
    text_width: int = 32,
    text_layers: int = 1,
    heads: int = 2,
    projection_dim: int = 32,
    seed: int = 0,
) -> Path:
    """Save a random OWLv2 (`kind="owlv2"`) or OWL-ViT (`kind="owlvit"`) model + processor to `folder`."""
    import torch
    import transformers as tf

    folder = Path(folder)
    tok_dir = folder / "_tokenizer_src"
    vocab_path, merges_path = write_clip_bpe(tok_dir)
    # from_pretrained on the two files works across transformers 4.x and 5.x (their __init__ differ).
    tokenizer = tf.CLIPTokenizer.from_pretrained(str(tok_dir), pad_token="!", model_max_length=16)
    vocab_size = len(json.loads(vocab_path.read_text(encoding="utf-8")))
    text = dict(
        vocab_size=vocab_size,
        hidden_size=text_width,
        intermediate_size=4 * text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=vision_width,
        intermediate_size=4 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    if kind == "owlv2":
        config = tf.Owlv2Config(text_config=text, vision_config=vision, projection_dim=projection_dim)
        model_cls, image_proc_cls, proc_cls = (
            tf.Owlv2ForObjectDetection,
            tf.Owlv2ImageProcessorPil,
            tf.Owlv2Processor,
        )
    elif kind == "owlvit":
        config = tf.OwlViTConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
        model_cls, image_proc_cls, proc_cls = (
            tf.OwlViTForObjectDetection,
            tf.OwlViTImageProcessorPil,
            tf.OwlViTProcessor,
        )
    else:
        raise ValueError(f"kind must be 'owlv2' or 'owlvit', got {kind!r}")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _tame_heads(model)
    size = {"height": image_size, "width": image_size}
    if kind == "owlv2":
        image_processor = image_proc_cls(size=size)
    else:
        image_processor = image_proc_cls(size=size, crop_size=size)
    proc_cls(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    model.save_pretrained(folder)
    for p in tok_dir.iterdir():
        p.unlink()
    tok_dir.rmdir()
    return folder


def _tame_heads(model) -> None:
    """Re-initialise the detection heads with small weights. transformers initialises them with unit
    variance, which saturates every box to a line and every score to 0 or 1; with small weights the
    boxes sit near OWL's per-patch prior boxes and the scores spread around the middle, so a random
    model gives plausible-looking (random) detections that exercise thresholds and NMS."""
    import torch

    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for head in (model.box_head, model.class_head):
            for module in head.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.05)
                    module.bias.zero_()
