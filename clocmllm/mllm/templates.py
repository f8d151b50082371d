"""Chat templates as (text, is_target) segments: `plain`, vicuna `v1`, the tokenizer's own.

Each template turns a conversation into segments; only assistant answers are targets, so
the labels mask everything else. Segments are tokenized one by one and concatenated, which
makes the target boundary exact (the same function builds the inference prompt, so training
and inference see the same tokens).

- `plain`: LLaVA's pretraining format, no system and no roles, `"\n"` separators. LLaVA's
  plain drops the question; we keep it (masked), since referring needs the box and region.
- `v1`: LLaVA-1.5's vicuna_v1: system, `USER: ... ASSISTANT: ...</s>`.
- `chat`: `tokenizer.apply_chat_template`; the assistant's span is found by rendering the
  conversation with and without each answer (prefix property checked, error otherwise).
- `auto`: `chat` when the tokenizer has a chat template, else `v1`.
"""

from __future__ import annotations

IMAGE_POSITIONS = ("first", "after_prompt")
CANDIDATE_POSITIONS = ("after_image", "after_prompt")

V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATES = ("plain", "v1", "chat", "auto")

Turn = tuple[str, str]  # (role: "user" | "assistant", text)


def resolve(template: str, tokenizer) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "v1"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'chat' needs a tokenizer with a chat_template")
    return template


def segments(
    template: str, turns: list[Turn], tokenizer, generation_prompt: bool = False
) -> list[tuple[str, bool]]:
    """Conversation -> [(text, is_target)]. With `generation_prompt`, ends where the answer starts."""
    template = resolve(template, tokenizer)
    eos = tokenizer.eos_token or ""
    out: list[tuple[str, bool]] = []
    if template == "plain":
        for role, text in turns:
            out.append((text + "\n", False) if role == "user" else (text + eos, True))
        return out
    if template == "v1":
        out.append((V1_SYSTEM + " ", False))
        for role, text in turns:
            if role == "user":
                out.append((f"USER: {text} ASSISTANT:", False))
            else:
                out.append((f" {text}{eos}", True))
        return out
    return _chat_segments(turns, tokenizer, generation_prompt)


def _chat_segments(turns: list[Turn], tokenizer, generation_prompt: bool) -> list[tuple[str, bool]]:
    messages = [{"role": r, "content": t} for r, t in turns]

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    out: list[tuple[str, bool]] = []
    done = ""
    for i, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        prefix = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise ValueError("the tokenizer's chat template is not prefix-stable; use template v1")
        out += [(prefix[len(done) :], False), (full[len(prefix) :], True)]
        done = full
    if generation_prompt or not turns or turns[-1][0] == "user":
        final = render(messages, generation_prompt) if turns else ""
        if not final.startswith(done):
            raise ValueError("the tokenizer's chat template is not prefix-stable; use template v1")
        if final[len(done) :]:
            out.append((final[len(done) :], False))
    return [(t, target) for t, target in out if t]


def place_image(text: str, where: str, image_token: str = "<image>") -> str:
    """Put the image of a first user message at its start (`first`) or its end (`after_prompt`).

    `first` is LLaVA's usual `<image>\n{question}`; LLaVA-1.5's instruction data also uses
    `{question}\n<image>`. `after_prompt` (our option, `model.image_position`) matters for a
    causal LLM trained from scratch: image tokens placed after the question can attend to it,
    so a patch can already mark "I am what is asked for" in the first layer, and the answer
    only has to find the marked patch (one attention hop instead of two).
    """
    if where not in IMAGE_POSITIONS:
        raise ValueError(f"model.image_position must be one of {IMAGE_POSITIONS}, got {where!r}")
    rest = text  # a message without the image keeps its text exactly (old behaviour for `first`)
    if image_token in text:
        sep = image_token + "\n" if image_token + "\n" in text else image_token
        rest = text.replace(sep, "", 1).strip()
    if where == "first":
        return f"{image_token}\n{rest}"
    return f"{rest}\n{image_token}"


CANDIDATE_POSITIONS = ("after_image", "after_prompt")


def insert_candidates(text: str, k: int, position: str = "after_image", image_token: str = "<image>") -> str:
    """The first user message with the candidate list right after `<image>` (or first), or
    at its end (`after_prompt`: the candidates then see the question, see proposer.py)."""
    from clocmllm.mllm.proposer import candidate_tokens

    block = " ".join(candidate_tokens(k))
    if position not in CANDIDATE_POSITIONS:
        raise ValueError(f"model.candidate_position must be one of {CANDIDATE_POSITIONS}, got {position!r}")
    if position == "after_prompt":
        return f"{text.rstrip()}\n{block}"
    if image_token in text:
        head, tail = text.split(image_token, 1)
        return f"{head}{image_token}\n{block}\n" + tail.removeprefix("\n")
    return f"{block}\n{text}"
