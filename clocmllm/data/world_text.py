"""The words of the synthetic world: captions, region phrases, referring expressions, chats.

Referring expressions are generated only when they pick exactly one object of the image:
- attribute expressions ('the red circle', 'the small circle', 'the cross') when exactly one
  object has those attribute values;
- relation expressions ('the circle left of the blue square') when the attribute part alone
  is ambiguous, the anchor has a unique description, and exactly one candidate stands in the
  relation to the anchor. Relations compare box centres with a margin of a quarter of the two
  objects' summed widths (heights for above/below); a candidate that passes only the loose test
  (centres ordered, margin not met) makes the expression ambiguous, so it is not generated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clocmllm.boxes import format_box, to_grid
from clocmllm.data.world_scene import Scene, WorldObject

# Attribute subsets, tried from the least to the most specific.
DESCRIPTIONS: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("color",),
    ("color", "shape"),
    ("size", "shape"),
    ("size", "color", "shape"),
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
MAX_ATTRIBUTE_REFS = 3
MAX_RELATION_REFS = 3

CAPTION_TEMPLATES = (
    "{objects} on {background}",
    "a picture of {objects} on {background}",
    "{background} with {objects}",
    "from left to right: {objects_lr}, on {background}",
)
REFERRING_QUESTIONS = (
    "What is the object at {box} <region>?",
    "What is in the region {box} <region>?",
    "Describe the object at {box} <region>.",
    "What do you see at {box} <region>?",
    "Name the object in {box} <region>.",
)
REFERRING_ANSWERS = ("a {phrase}", "It is a {phrase}.", "The {phrase}.")
GROUNDING_QUESTIONS = (
    "Where is {ref}?",
    "Locate {ref}.",
    "Find {ref} and give its box.",
    "What are the coordinates of {ref}?",
    "Give the bounding box of {ref}.",
)


def describe(obj: WorldObject, attrs: Sequence[str]) -> str:
    """Words for an attribute subset, e.g. ('color','shape') -> 'red circle', ('color',) -> 'red object'."""
    words = [obj.attr(a) for a in ("size", "color", "shape") if a in attrs]
    if "shape" not in attrs:
        words.append("object")
    return " ".join(words)


def matches(objects: Sequence[WorldObject], obj: WorldObject, attrs: Sequence[str]) -> list[int]:
    """Indices of the objects that a description of `obj` by `attrs` fits."""
    return [k for k, o in enumerate(objects) if all(o.attr(a) == obj.attr(a) for a in attrs)]


def join_list(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene: Scene, rng: np.random.Generator) -> str:
    order = rng.permutation(len(scene.objects))
    objs = [f"a {scene.objects[k].phrase}" for k in order]
    objs_lr = [f"a {o.phrase}" for o in sorted(scene.objects, key=lambda o: o.cx)]
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    if not objs:
        return f"an empty scene on {scene.background.phrase}"
    if len(objs) == 1 and "{objects_lr}" in template:
        template = CAPTION_TEMPLATES[0]
    return template.format(
        objects=join_list(objs), objects_lr=join_list(objs_lr), background=scene.background.phrase
    )


def _relation(a: WorldObject, b: WorldObject, rel: str, strict: bool) -> bool:
    """Does `a` stand `rel` to `b`? Strict: with the margin; loose: centres ordered at all."""
    ba, bb = a.box, b.box
    if rel in ("left of", "right of"):
        margin = 0.25 * ((ba[2] - ba[0]) + (bb[2] - bb[0])) if strict else 0.0
        gap = b.cx - a.cx if rel == "left of" else a.cx - b.cx
    else:
        margin = 0.25 * ((ba[3] - ba[1]) + (bb[3] - bb[1])) if strict else 0.0
        gap = b.cy - a.cy if rel == "above" else a.cy - b.cy
    return gap > margin


def unique_description(objects: Sequence[WorldObject], k: int) -> tuple[str, ...] | None:
    for attrs in DESCRIPTIONS:
        if matches(objects, objects[k], attrs) == [k]:
            return attrs
    return None


def referring_expressions(objects: Sequence[WorldObject], rng: np.random.Generator) -> list[list[str]]:
    """For each object, the expressions that pick it and only it (see module docstring)."""
    out: list[list[str]] = []
    for i, obj in enumerate(objects):
        attribute_refs = [f"the {describe(obj, a)}" for a in DESCRIPTIONS if matches(objects, obj, a) == [i]]
        relation_refs = []
        for attrs in (("shape",), ("color", "shape")):
            cands = matches(objects, obj, attrs)
            if len(cands) < 2:
                continue  # not ambiguous: no relation needed
            for j, anchor in enumerate(objects):
                if j in cands:
                    continue  # the anchor must not itself fit the description
                anchor_attrs = unique_description(objects, j)
                if anchor_attrs is None:
                    continue
                for rel in RELATIONS:
                    strict = [k for k in cands if _relation(objects[k], anchor, rel, True)]
                    loose = [k for k in cands if _relation(objects[k], anchor, rel, False)]
                    if strict == [i] and loose == [i]:
                        relation_refs.append(
                            f"the {describe(obj, attrs)} {rel} the {describe(anchor, anchor_attrs)}"
                        )
        out.append(
            _pick(attribute_refs, MAX_ATTRIBUTE_REFS, rng) + _pick(relation_refs, MAX_RELATION_REFS, rng)
        )
    return out


def _pick(items: list[str], n: int, rng: np.random.Generator) -> list[str]:
    if len(items) <= n:
        return items
    keep = sorted(rng.choice(len(items), size=n, replace=False).tolist())
    return [items[k] for k in keep]


def grid_text(box: Sequence[float], size: int) -> str:
    return format_box(to_grid(box, size, size, size=size))


def conversations(
    scene: Scene,
    boxes: Sequence[list[float]],
    refs: Sequence[list[str]],
    image: str,
    uid: str,
    rng: np.random.Generator,
) -> list[dict]:
    """One referring (box -> description) and one grounding (expression -> box) chat, 1-2 turns each."""
    size = scene.size
    n = len(scene.objects)
    out = []
    if n == 0:
        return out
    base = {"image": image, "width": size, "height": size}
    # Referring
    picks = rng.permutation(n)[: int(rng.integers(1, min(2, n) + 1))]
    turns, turn_boxes = [], []
    for t, k in enumerate(picks):
        q = REFERRING_QUESTIONS[rng.integers(len(REFERRING_QUESTIONS))].format(box=grid_text(boxes[k], size))
        a = REFERRING_ANSWERS[rng.integers(len(REFERRING_ANSWERS))].format(phrase=scene.objects[k].phrase)
        turns += [
            {"from": "human", "value": ("<image>\n" if t == 0 else "") + q},
            {"from": "gpt", "value": a},
        ]
        turn_boxes.append(boxes[k])
    out.append({"id": f"{uid}-ref", **base, "task": "referring", "boxes": turn_boxes, "conversations": turns})
    # Grounding
    pairs = [(k, ref) for k in range(n) for ref in refs[k]]
    if pairs:
        picks = rng.permutation(len(pairs))[: int(rng.integers(1, min(2, len(pairs)) + 1))]
        turns, turn_boxes = [], []
        for t, p in enumerate(picks):
            k, ref = pairs[p]
            q = GROUNDING_QUESTIONS[rng.integers(len(GROUNDING_QUESTIONS))].format(ref=ref)
            turns += [
                {"from": "human", "value": ("<image>\n" if t == 0 else "") + q},
                {"from": "gpt", "value": grid_text(boxes[k], size)},
            ]
            turn_boxes.append(boxes[k])
        out.append(
            {"id": f"{uid}-grd", **base, "task": "grounding", "boxes": turn_boxes, "conversations": turns}
        )
    return out
