"""Recall@k with text-match hits (numpy only).

A retrieved item is a hit when its *text* equals the query's text, not only when it is the
query's own pair: synthetic and VESL data repeat phrases ("red circle") across images, and
an identical phrase elsewhere is as correct an answer as the paired one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def recall_at_k(
    queries: np.ndarray,
    keys: np.ndarray,
    query_labels: Sequence[str],
    key_labels: Sequence[str],
    ks: Sequence[int] = (1, 5),
) -> dict[int, float]:
    """Share of queries with a same-label key among their top-k by cosine similarity."""
    if len(queries) == 0 or len(keys) == 0:
        return {k: float("nan") for k in ks}
    sims = normalize(queries) @ normalize(keys).T  # [Q, K]
    order = np.argsort(-sims, axis=1, kind="stable")
    q = np.asarray(query_labels, dtype=object)
    kl = np.asarray(key_labels, dtype=object)
    hits = kl[order] == q[:, None]  # [Q, K] in rank order
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), len(keys))
    return {k: float(np.mean(first < k)) for k in ks}


def mean_class_accuracy(pred: Sequence[str], truth: Sequence[str]) -> float:
    """Accuracy averaged over classes (mAcc, as CLOC reports for COCO/LVIS regions)."""
    pred_a, truth_a = np.asarray(pred, dtype=object), np.asarray(truth, dtype=object)
    accs = [float(np.mean(pred_a[truth_a == c] == c)) for c in sorted(set(truth))]
    return float(np.mean(accs)) if accs else float("nan")


def chance_recall_at_k(
    query_labels: Sequence[str], key_labels: Sequence[str], ks: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """Expected `recall_at_k` of a uniformly random ranking (the chance level of a pool).

    A query whose label c keys of the n carry misses the top k with probability
    C(n-c, k) / C(n, k) = prod_{i<k} (n-c-i)/(n-i); with text-match hits, repeated captions
    raise chance above k/n, so a "beats chance" claim must use this, not k/n.
    """
    n = len(key_labels)
    if len(query_labels) == 0 or n == 0:
        return {k: float("nan") for k in ks}
    counts: dict[str, int] = {}
    for label in key_labels:
        counts[label] = counts.get(label, 0) + 1
    out = {}
    for k in ks:
        miss = []
        for q in query_labels:
            c, p = counts.get(q, 0), 1.0
            for i in range(min(k, n)):
                p *= max(n - c - i, 0) / (n - i)
            miss.append(p)
        out[k] = float(1.0 - np.mean(miss))
    return out
