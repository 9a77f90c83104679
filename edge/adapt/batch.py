"""``Learner.learn_many``: test-then-train on a batch, vectorised where the learner allows.

Every accepted row is scored by the champion, the global head and the trivial
reference before anything learns from it (prequential, as ``learn_one``); then one
optimizer step (``steps_per_label``, boosted after a drift) runs on the batch plus its
share of recent and replayed rows, in the proportions of a ``learn_one`` batch. Per-row
Python is left only where the rule is sequential: the class-balanced reservoir, the
sequential promotion test, the label guard. The guard and the training budget are the learner's
own (``Learner._observe_guard``, ``Learner._grant``), the same rules as ``learn_one``'s: a
batch of contradicting labels is held as the same labels one by one, and the budget pays
for ``steps_per_label`` steps a row, the first rows first (the others are scored and kept
for replay, not trained, and counted as skipped). Drift detectors see the batch once (Page-Hinkley weighs the batch
mean by its row count; ADWIN takes it as one value). Kept apart from ``learner.py``
so that the learner reads as the per-label rule; it uses the learner's own parts.
"""
from __future__ import annotations

import time

import numpy as np

from edge.adapt.metrics import FADE_FAST as _FADE
from edge.adapt.metrics import FADE_SLOW as _SLOW
from edge.adapt.metrics import fade_weights, sample_losses


def learn_many(lr, Z, Y) -> dict:
    """Test then train on a batch: every row is scored by every head before one step on
    the batch plus its share of replayed rows (``batch - 1`` new rows per reservoir
    share, as ``learn_one``). Rows that ``learn_one`` would reject are rejected and
    counted; returns ``{"accepted", "served" [n, K], "challenger" [n, K], "drift", "swap"}``:
    the champion's and the challenger's scores of the accepted rows before they trained."""
    Z = np.asarray(Z, np.float32).reshape(len(Z), -1) if len(Z) else np.zeros((0, lr.feature_size), np.float32)
    if Z.shape[1] != lr.feature_size or _count(Y) != len(Z):  # features of another width, or not one label a row
        lr.rejected["bad_shape"] += len(Z)
        return {"accepted": 0, "served": np.zeros((0, lr.outputs)), "drift": None, "swap": None}
    keep = np.isfinite(Z).all(1)
    if not keep.all():
        lr.rejected["non_finite"] += int((~keep).sum())
    rows, T = _targets(lr, Y, np.flatnonzero(keep))
    if not len(rows):
        return {"accepted": 0, "served": np.zeros((0, lr.outputs)), "drift": None, "swap": None}
    Z = Z[rows]
    m = len(Z)
    cfg, preq, counters = lr.cfg, lr.preq, lr.counters
    champion, glob = lr.champion, lr._global
    s_champ = champion.predict(Z)
    l_champ, e_champ = sample_losses(s_champ, T, lr.task)
    preq["champion"].update_many(l_champ, e_champ)
    if champion is glob:
        s_glob, l_glob, e_glob = s_champ, l_champ, e_champ
    else:
        s_glob = glob.predict(Z)
        l_glob, e_glob = sample_losses(s_glob, T, lr.task)
    preq["global"].update_many(l_glob, e_glob)
    held = lr._observe_guard(s_champ, s_glob, T) if lr.guard is not None else False
    l_ref, e_ref = sample_losses(lr.reference.learn_many(T), T, lr.task)
    preq["reference"].update_many(l_ref, e_ref)
    lr._reference_snap = None
    boosting = lr.boost_left > 0
    if boosting != lr._boosting:
        lr._set_sources(boosting=boosting)
    tr = lr.trainer
    tr.set_lr(lr.lr * cfg.boost_lr if boosting else lr.lr)
    steps = cfg.steps_per_label * cfg.boost_steps if boosting else cfg.steps_per_label
    k = lr._grant(m, steps)  # the first k rows train, as learn_one's labels would until the budget ran out
    n_rec, n_rep = (n for _, n in lr._sources)
    scale = k / max(1, cfg.batch - n_rec - n_rep)
    idx_rec = lr.recent.sample_indices(int(round(n_rec * scale)))
    idx_rep = lr.replay.sample_indices(int(round(n_rep * scale)))
    zb = np.concatenate([Z, lr.recent.z[idx_rec], lr.replay.z[idx_rep]])
    if lr.scaler is not None:
        lr.scaler.learn_many(Z)
        lr.scaler.transform_many(zb, out=zb)
    yb = np.concatenate([T, lr.recent.y[idx_rec], lr.replay.y[idx_rep]])
    before = lr._arrays_if(held)
    t0 = time.perf_counter()
    if k < m:  # scored before any step, then only the paid rows (and their replay share) train
        s_chal = np.stack([tr.score(z) for z in zb[:m]])
        keep = np.r_[0:k, m:len(zb)]
        zb, yb = zb[keep], yb[keep]
    tr.last_loss_of = (k + len(idx_rec), len(zb))
    for i in range(steps if k else 0):
        s = tr.step_arrays(zb, yb, first=m if i == 0 and k == m else 0)
        if i == 0 and k == m:
            s_chal = s
    lr.budget.charge(time.perf_counter() - t0)
    lr._keep_apart(before)
    counters["train_steps"] += k * steps  # label-steps, as learn_one counts them
    if len(idx_rep) and k:
        lr._fade("replay", tr.last_loss)
    l_chal, e_chal = sample_losses(s_chal, T, lr.task)
    preq["challenger"].update_many(l_chal, e_chal)
    pairs, (m_p, m_r, m_b, scale) = lr.pairs, lr._margins  # fixed before the batch, as the test needs
    lc, lh = l_champ.tolist(), l_chal.tolist()
    pairs["promote"].update_many(lc, lh, m_p, scale)
    if champion is not glob:
        pairs["refresh"].update_many(lc, lh, m_r, scale)
        pairs["rollback"].update_many(lc, l_glob.tolist(), m_b, scale)
    f = lr.fade  # the batch's rows, faded in as row by row
    for key, decay in (("new", _FADE), ("slow", _SLOW)):
        w, total, last = fade_weights(decay, m)
        f[key] = last * f.get(key, 0.0) + float(w @ e_chal)
        f["w_" + key] = last * f.get("w_" + key, 0.0) + total
    lr.replay.add_many(Z, T)
    lr.recent.add_many(Z, T)
    if lr.trainer.logit_offset is not None:
        lr._update_logit_offset()
    lr.since_swap += m
    lr.boost_left = max(0, lr.boost_left - m)
    f["since_trigger"] += m - 1
    f["above"] = f["above"] + m - 1 if f["above"] else 0
    watch = e_champ if cfg.drift_on == "error" else l_champ
    if lr.exceed is not None:  # regression: exceedances of the error's running quantile (Learner)
        watch = np.array([lr.exceed.update(x) for x in np.asarray(watch, np.float64).reshape(-1).tolist()])
    drift = lr._update_drift_many(float(watch.mean()), m) or lr._loss_ratio_trigger()
    counters["labels"] += m
    swap = lr._maybe_swap()
    return {"accepted": m, "served": s_champ, "challenger": s_chal, "drift": drift, "swap": swap}


def _count(Y) -> int:
    try:
        return len(Y)
    except TypeError:  # a scalar
        return -1


def _targets(lr, Y, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows among ``rows`` whose label ``Learner._target`` accepts, and their targets
    (class indices, or ``[m, outputs]`` values); the others are counted as rejected by
    the same reasons. Numeric labels are checked at once; anything else row by row."""
    task = lr.task
    try:
        A = np.asarray(Y) if task == "classification" else np.asarray(Y, np.float32)
    except (TypeError, ValueError):  # ragged: row by row
        A = None
    if A is not None and task == "classification" and A.dtype.kind in "biuf" and A.size == len(A) and len(rows):
        v = A.reshape(-1)[rows]
        ok = (v >= 0) & (v < lr._n_classes)
        if v.dtype.kind == "f":
            ok &= v == np.floor(v)  # NaN and inf fail
        if not ok.all():
            lr.rejected["unknown_class"] += int((~ok).sum())
        return rows[ok], v[ok].astype(np.int64)
    if A is not None and task != "classification" and A.dtype.kind == "f" and len(A) and A.size == len(A) * lr.outputs:
        v = A.reshape(len(A), lr.outputs)[rows]
        ok = np.isfinite(v).all(1)
        if not ok.all():
            lr.rejected["non_finite"] += int((~ok).sum())
        return rows[ok], v[ok]
    kept, targets = [], []
    for i in rows.tolist():
        t, why = lr._target(Y[i])
        if why:
            lr.reject(why)
        else:
            kept.append(i)
            targets.append(t)
    if not kept:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    T = np.asarray(targets, np.int64) if task == "classification" else np.stack(targets).astype(np.float32)
    return np.asarray(kept, np.int64), T
