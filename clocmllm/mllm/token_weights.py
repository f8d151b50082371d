"""Per-token loss weights by token string (`train.token_loss_weights: {regex: weight}`).

Why: on a small image the 0-999 grid is finer than a pixel (64 px: 15.6 grid units a pixel),
so with the demo's digit tokenizer the tens and units digits of a box are noise the model
cannot predict (their teacher-forced loss stays at ln 10). Their gradients carry no signal
and, through Adam's shared second moments, dilute the steps on the informative tokens. A weight
below 1 for such tokens (e.g. `{"^##\\d$": 0.1}`, the demo tokenizer's digit continuations)
keeps them in the answer but turns their gradients down. Default: none (plain mean loss).

The loss is the weighted mean over answer tokens: sum(w * ce) / sum(w), so with all weights 1
it equals the LLM's own mean cross-entropy.
"""

from __future__ import annotations

import re

import torch

from clocmllm.mllm.dataset import IGNORE_INDEX


def weight_table(tokenizer, patterns: dict[str, float]) -> torch.Tensor:
    """[vocab] weight per token id: the first matching pattern's weight, else 1."""
    compiled = []
    for pattern, weight in patterns.items():
        try:
            compiled.append((re.compile(pattern), float(weight)))
        except (re.error, TypeError, ValueError) as err:
            raise ValueError(f"train.token_loss_weights: {pattern!r}: {err}") from err
    table = torch.ones(len(tokenizer))
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        for rx, weight in compiled:
            if tok is not None and rx.search(tok):
                table[i] = weight
                break
    return table


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, each target weighted by `table[target]`."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    keep = labels != IGNORE_INDEX
    target = labels.clamp(min=0)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    w = table.to(logits.device)[target] * keep
    return (ce * w).sum() / w.sum().clamp(min=1e-8)
