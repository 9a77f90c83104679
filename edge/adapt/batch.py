"""``Learner.learn_many``'s batch mechanics: which rows a batch accepts, and one step on them.

``Learner.learn_many`` scores every accepted row with every head before anything learns
from it (prequential, as ``learn_one``), then trains: one optimizer step
(``steps_per_label``, boosted after a drift) on the batch plus its share of recent and
replayed rows, in the proportions of a ``learn_one`` batch. The guard, the training budget,
the counters, plasticity and the swap go through the learner's one accounting path
(``Learner._admit`` before training, ``Learner._settle`` after): a batch of contradicting
labels is held as the same labels one by one, and the budget pays ``steps_per_label``
steps a row, the first rows first (the others are scored and kept for replay, not
trained, and counted as skipped). These functions take the parts they use as arguments
and return values; they keep no state of their own.
"""
from __future__ import annotations

import numpy as np


def accepted_rows(Z, Y, *, task: str, feature_size: int, outputs: int, n_classes: int, target, rejected):
    """``(Z [m, D], T)``: the rows ``learn_one`` would accept, with their targets; the others are
    counted in ``rejected`` (a Counter) by the reasons ``learn_one`` gives."""
    Z = np.asarray(Z, np.float32).reshape(len(Z), -1) if len(Z) else np.zeros((0, feature_size), np.float32)
    if Z.shape[1] != feature_size or _count(Y) != len(Z):  # features of another width, or not one label a row
        rejected["bad_shape"] += len(Z)
        return Z[:0], None
    keep = np.isfinite(Z).all(1)
    if not keep.all():
        rejected["non_finite"] += int((~keep).sum())
    rows, T = _targets(Y, np.flatnonzero(keep), task=task, outputs=outputs, n_classes=n_classes, target=target,
                       rejected=rejected)
    return Z[rows], T


def train_rows(trainer, Z: np.ndarray, T, *, paid: int, steps: int, sources, batch_size: int, scaler):
    """``steps`` steps on the first ``paid`` rows of ``Z`` plus their share of each source's rows
    (``sources``: ``[(buffer, rows per learn_one batch), ...]``, recent then reservoir).
    Returns the challenger's scores of every row before the first step, and the replayed
    rows' loss of that step (the plasticity rule's), or None without one."""
    m = len(Z)
    (recent, n_rec), (replay, n_rep) = sources
    share = paid / max(1, batch_size - n_rec - n_rep)
    idx_rec = recent.sample_indices(int(round(n_rec * share)))
    idx_rep = replay.sample_indices(int(round(n_rep * share)))
    if scaler is not None:
        scaler.learn_many(Z)
    if trainer.compiled and paid == m and steps:  # gather, scale and the first step in one compiled call
        s_chal, zb, yb = trainer.fill_step_many(Z, T, recent, idx_rec, replay, idx_rep, scaler,
                                                replay_loss=len(idx_rep) > 0)
        trainer.last_loss_of = (paid + len(idx_rec), len(zb))
        for _ in range(steps - 1):
            trainer.step_arrays(zb, yb, first=0)
        return s_chal, trainer.last_loss if len(idx_rep) else None
    zb = np.concatenate([Z, recent.z[idx_rec], replay.z[idx_rep]])
    if scaler is not None:
        scaler.transform_many(zb, out=zb)
    yb = np.concatenate([T, recent.y[idx_rec], replay.y[idx_rep]])
    s_chal = None
    if paid < m:  # scored before any step, then only the paid rows (and their replay share) train
        s_chal = np.stack([trainer.score(z) for z in zb[:m]])
        keep = np.r_[0:paid, m:len(zb)]
        zb, yb = zb[keep], yb[keep]
    trainer.last_loss_of = (paid + len(idx_rec), len(zb))
    for i in range(steps if paid else 0):
        s = trainer.step_arrays(zb, yb, first=m if i == 0 and paid == m else 0)
        if i == 0 and paid == m:
            s_chal = s
    return s_chal, trainer.last_loss if len(idx_rep) and paid else None


def _count(Y) -> int:
    try:
        return len(Y)
    except TypeError:  # a scalar
        return -1


def _targets(Y, rows: np.ndarray, *, task, outputs, n_classes, target, rejected) -> tuple[np.ndarray, np.ndarray]:
    """The rows among ``rows`` whose label ``target`` (``Learner._target``) accepts, and their
    targets (class indices, or ``[m, outputs]`` values); the others are counted in
    ``rejected`` by the same reasons. Numeric labels are checked at once; anything else
    row by row."""
    try:
        A = np.asarray(Y) if task == "classification" else np.asarray(Y, np.float32)
    except (TypeError, ValueError):  # ragged: row by row
        A = None
    if A is not None and task == "classification" and A.dtype.kind in "biuf" and A.size == len(A) and len(rows):
        v = A.reshape(-1)[rows]
        ok = (v >= 0) & (v < n_classes)
        if v.dtype.kind == "f":
            ok &= v == np.floor(v)  # NaN and inf fail
        if not ok.all():
            rejected["unknown_class"] += int((~ok).sum())
        return rows[ok], v[ok].astype(np.int64)
    if A is not None and task != "classification" and A.dtype.kind == "f" and len(A) and A.size == len(A) * outputs:
        v = A.reshape(len(A), outputs)[rows]
        ok = np.isfinite(v).all(1)
        if not ok.all():
            rejected["non_finite"] += int((~ok).sum())
        return rows[ok], v[ok]
    kept, targets = [], []
    for i in rows.tolist():
        t, why = target(Y[i])
        if why:
            rejected[why] += 1
        else:
            kept.append(i)
            targets.append(t)
    if not kept:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    T = np.asarray(targets, np.int64) if task == "classification" else np.stack(targets).astype(np.float32)
    return np.asarray(kept, np.int64), T
