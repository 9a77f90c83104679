"""The one softmax and the one sigmoid of the adapt engine.

Every head, the trainer, the learner's scoring and the serving snapshot turn logits into
scores here, so that a score is the same number whichever path computed it (the serving
thread, a prequential test, a training step). Inputs are clipped at +-60 before ``exp``:
``exp(60)`` is far inside float32, and a logit beyond it is a certainty either way.

>>> import numpy as np
>>> s = softmax(np.array([[0.0, 0.0], [1000.0, 0.0]], np.float32))
>>> s.round(3).tolist()
[[0.5, 0.5], [1.0, 0.0]]
>>> binary_scores(np.array([[0.0], [-1000.0]], np.float32)).round(3).tolist()
[[0.5, 0.5], [1.0, 0.0]]
>>> round(sigmoid(0.0), 3), sigmoid(-1e9) == 0.0 or sigmoid(-1e9) < 1e-25
(0.5, True)
"""
from __future__ import annotations

import math

import numpy as np

CLIP = 60.0


def softmax(s: np.ndarray, *, inplace: bool = False) -> np.ndarray:
    """Row-wise softmax of a 2-D (or 1-D) array of logits; ``inplace`` reuses ``s``."""
    if not inplace:
        s = np.array(s, dtype=np.result_type(s, np.float32), copy=True)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def sigmoid_array(s: np.ndarray, *, inplace: bool = False) -> np.ndarray:
    """Element-wise logistic function, clipped at +-``CLIP``; ``inplace`` reuses ``s``."""
    if not inplace:
        s = np.array(s, dtype=np.result_type(s, np.float32), copy=True)
    np.clip(s, -CLIP, CLIP, out=s)
    np.negative(s, out=s)
    np.exp(s, out=s)
    s += 1.0
    np.reciprocal(s, out=s)
    return s


def sigmoid(x: float) -> float:
    """The logistic function of one float (no numpy call: the per-row path)."""
    return 1.0 / (1.0 + math.exp(-max(-CLIP, min(CLIP, float(x)))))


def binary_scores(s: np.ndarray) -> np.ndarray:
    """``[1 - p, p]`` per row for one binary logit per row (the softmax of ``[0, s]``)."""
    p = sigmoid_array(np.asarray(s)[..., :1])
    return np.concatenate([1.0 - p, p], axis=-1)
