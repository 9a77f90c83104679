"""What fleet sync needs from a head: its initial arrays, its shapes, and setting them.

``initial_arrays`` is version 0 of a fleet's global head: the shipped head in the given
head kind (for ``mlp``, with the first layer every device draws alike).
``set_head_arrays`` makes a live head's ``arrays()`` equal to given arrays, which is
how a device rebases on a new global head (``edge.fleet.client``).
"""
from __future__ import annotations

import numpy as np

from edge.adapt.heads import make_head


LANE_HEX = 16  # hex digits of a model's content hash that name its lane in topics


def lane_key(model_hash: str) -> str:
    """The topic level that names the aggregation lane of a model (FORMAT.md "Lanes"): the
    first 16 hex digits of its content hash. The server's own model's lane has no level.

    >>> lane_key("0123456789abcdef0123456789abcdef")
    '0123456789abcdef'
    """
    return model_hash[:LANE_HEX]


def _laned(topic: str, lane: str) -> str:
    return f"{topic}/{lane}" if lane else topic


def delta_topic(prefix: str, fleet: str, model: str, node: str) -> str:
    """One topic for every lane: the server routes a delta by its signed header's model hash."""
    return f"{prefix}/{fleet}/{model}/delta/{node}"


def global_topic(prefix: str, fleet: str, model: str, lane: str = "") -> str:
    """The retained signed head of a lane: ``.../global`` for the server's own model,
    ``.../global/<lane>`` for a release's (``lane_key``).

    >>> global_topic("fleet", "f", "m"), global_topic("fleet", "f", "m", "0123456789abcdef")
    ('fleet/f/m/global', 'fleet/f/m/global/0123456789abcdef')
    """
    return _laned(f"{prefix}/{fleet}/{model}/global", lane)


def receipt_topic(prefix: str, fleet: str, model: str, node: str, lane: str = "") -> str:
    """Where the server answers each of ``node``'s deltas (``edge.fleet.receipts``) of a lane."""
    return _laned(f"{prefix}/{fleet}/{model}/receipt/{node}", lane)


def request_topic(prefix: str, fleet: str, model: str, node: str, lane: str = "") -> str:
    """Where ``node`` asks the server to publish its lane's latest signed head (any payload)."""
    return _laned(f"{prefix}/{fleet}/{model}/request/{node}", lane)


def head_options(kind: str, *, rank: int, hidden: int) -> dict:
    return {"rank": rank} if kind == "lowrank" else {"hidden": hidden} if kind == "mlp" else {}


def initial_arrays(model, *, kind: str, rank: int = 4, hidden: int = 32) -> dict[str, np.ndarray]:
    """Version 0 of the global head of ``model`` (a ``ModelFolder``) for head ``kind``; built
    as the devices' learner builds its head (``AdaptConfig.head_options``), so an ``mlp``
    head's first layer is the same random draw on every device and on the server."""
    m = model.manifest
    _, sd = model.arrays()
    opts = head_options(kind, rank=rank, hidden=hidden)
    outputs = len(m.classes) if m.task == "classification" else m.outputs
    head = make_head(kind, in_features=m.feature_size, out_features=outputs, base_weight=sd["weight"],
                     base_bias=sd["bias"], **opts)
    return head.arrays()


def set_head_arrays(head, arrays: dict) -> None:
    """Set ``head`` so that ``head.arrays()`` equals ``arrays`` (in place: optimizer state and
    views stay valid). A low-rank head takes the whole target as its base and a zero
    residual; the others keep their structure.

    >>> h = make_head("mlp", in_features=3, out_features=2, hidden=4)
    >>> target = {k: v + 1 for k, v in h.arrays().items()}
    >>> set_head_arrays(h, target)
    >>> all(np.allclose(h.arrays()[k], target[k]) for k in target)
    True
    """
    t = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
    if head.kind == "linear":
        head.weight[...] = t["weight"]
        head.bias[...] = t["bias"]
    elif head.kind == "lowrank":
        head.base_weight[...] = t["weight"]
        head.base_bias[...] = t["bias"]
        head.reset_to_base()
    else:
        head.base_weight[...] = t["weight"]
        head.base_bias[...] = t["bias"]
        for k in ("w1", "b1", "w2", "b2"):
            getattr(head, k)[...] = t[k]
