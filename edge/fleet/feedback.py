"""Compression with error feedback: what is not sent this time stays for the next.

Pure. A device's *pending* update is everything it learned since its base global head
that it has not sent yet (``head - base - sent_since_base``). ``encode_pending``
compresses it; the part the compression dropped or rounded away is the ``residual``,
which stays in the pending update and goes out in a later round. So over any number of
rounds, what was sent plus the residual equals what was learned (property-tested in
``tests/test_fleet_codec.py``).

>>> import numpy as np
>>> step = encode_pending({"w": np.array([4.0, 0.5, -1.0], np.float32)}, encoding="topk8", fraction=0.2)
>>> step.sent["w"].tolist(), step.residual["w"].tolist()
([4.0, 0.0, 0.0], [0.0, 0.5, -1.0])
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge.fleet.codec import EncodedTensor, encode_tensor


@dataclass(frozen=True)
class FeedbackStep:
    """One round: the tensors to pack, what the receiver decodes (``sent``) and what stays."""

    tensors: dict[str, EncodedTensor]
    sent: dict[str, np.ndarray]
    residual: dict[str, np.ndarray]


def topk_budget(pending: dict, fraction: float) -> dict[str, int]:
    """Entries per array for a top-k over the whole parameter set: the ``ceil(fraction * total)``
    largest magnitudes, wherever they are (an array whose entries are all small sends none).

    >>> topk_budget({"a": np.array([5.0, 0.1]), "b": np.array([3.0, 0.2, 0.0, 0.0])}, 0.3)
    {'a': 1, 'b': 1}
    """
    arrays = {k: np.abs(np.asarray(v, np.float32)).reshape(-1) for k, v in pending.items()}
    total = sum(v.size for v in arrays.values())
    if total == 0:
        return {k: 0 for k in arrays}
    k = min(total, max(1, int(np.ceil(fraction * total))))
    allv = np.concatenate(list(arrays.values()))
    thr = np.partition(allv, total - k)[total - k]
    counts = {n: int((v > thr).sum()) for n, v in arrays.items()}
    ties = k - sum(counts.values())  # entries equal to the threshold fill the rest, in array order
    for n, v in arrays.items():
        take = min(ties, int((v == thr).sum()))
        counts[n] += take
        ties -= take
    return counts


def encode_pending(pending: dict, *, encoding: str, fraction: float = 0.01) -> FeedbackStep:
    """Compress every array of ``pending``; ``residual = pending - sent`` exactly (in float32).

    For ``topk8`` the budget is ``fraction`` of all entries together (``topk_budget``)."""
    tensors, sent, residual = {}, {}, {}
    budget = topk_budget(pending, fraction) if encoding == "topk8" else {}
    for name, a in pending.items():
        a = np.asarray(a, dtype=np.float32)
        t = encode_tensor(a, encoding, fraction=fraction, k=budget.get(name))
        tensors[name], sent[name] = t, t.decoded
        residual[name] = a - t.decoded
    return FeedbackStep(tensors=tensors, sent=sent, residual=residual)


def subtract(a: dict, b: dict) -> dict:
    """``a - b`` array by array (same keys)."""
    return {k: np.asarray(a[k], np.float32) - np.asarray(b[k], np.float32) for k in a}


def add(a: dict, b: dict) -> dict:
    """``a + b`` array by array (same keys)."""
    return {k: np.asarray(a[k], np.float32) + np.asarray(b[k], np.float32) for k in a}


def l2_norm(arrays: dict) -> float:
    """The L2 norm of all arrays together, as one vector.

    >>> l2_norm({"a": np.array([3.0]), "b": np.array([[4.0]])})
    5.0
    """
    return float(np.sqrt(sum(float(np.square(np.asarray(v, np.float64)).sum()) for v in arrays.values())))
