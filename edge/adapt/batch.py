"""``Learner.learn_many``: test-then-train on a batch, vectorised where the learner allows.

Every accepted row is scored by the champion, the global head and the trivial
reference before anything learns from it (prequential, as ``learn_one``); then one
optimizer step (``steps_per_label``, boosted after a drift) runs on the batch plus its
share of recent and replayed rows, in the proportions of a ``learn_one`` batch. Per-row
Python is left only where the rule is sequential: the class-balanced reservoir, the
paired-test blocks. Drift detectors see the batch once (Page-Hinkley weighs the batch
mean by its row count; ADWIN takes it as one value). Kept apart from ``learner.py``
so that the learner reads as the per-label rule; it uses the learner's own parts.
"""
from __future__ import annotations

import numpy as np

from edge.adapt.metrics import FADE_FAST as _FADE
from edge.adapt.metrics import FADE_SLOW as _SLOW
from edge.adapt.metrics import sample_losses


def learn_many(lr, Z, Y) -> dict:
    """Test then train on a batch: every row is scored by every head before one step on
    the batch plus its share of replayed rows (``batch - 1`` new rows per reservoir
    share, as ``learn_one``). Rows that ``learn_one`` would reject are rejected and
    counted; returns ``{"accepted", "served" [n, K], "drift", "swap"}``."""
    Z = np.asarray(Z, np.float32).reshape(len(Z), -1) if len(Z) else np.zeros((0, lr.feature_size), np.float32)
    if Z.shape[1] != lr.feature_size:
        for _ in range(len(Z)):
            lr.reject("bad_shape")
        return {"accepted": 0, "served": np.zeros((0, lr.outputs)), "drift": None, "swap": None}
    keep = np.isfinite(Z).all(1)
    for _ in range(int((~keep).sum())):
        lr.reject("non_finite")
    targets = []
    rows = []
    for i in np.flatnonzero(keep).tolist():
        t, why = lr._target(Y[i])
        if why:
            lr.reject(why)
        else:
            targets.append(t)
            rows.append(i)
    if not rows:
        return {"accepted": 0, "served": np.zeros((0, lr.outputs)), "drift": None, "swap": None}
    Z = Z[rows]
    T = np.asarray(targets, np.int64) if lr.task == "classification" else np.stack(targets).astype(np.float32)
    m = len(Z)
    cfg, preq, counters = lr.cfg, lr.preq, lr.counters
    champion, glob = lr.champion, lr._global
    s_champ = champion.predict(Z)
    l_champ, e_champ = sample_losses(s_champ, T, lr.task)
    preq["champion"].update_many(l_champ, e_champ)
    if champion is glob:
        l_glob, e_glob = l_champ, e_champ
    else:
        l_glob, e_glob = sample_losses(glob.predict(Z), T, lr.task)
    preq["global"].update_many(l_glob, e_glob)
    l_ref, e_ref = sample_losses(lr.reference.learn_many(T), T, lr.task)
    preq["reference"].update_many(l_ref, e_ref)
    lr._reference_snap = None
    boosting = lr.boost_left > 0
    if boosting != lr._boosting:
        lr._set_sources(boosting=boosting)
    tr = lr.trainer
    tr.set_lr(lr.lr * cfg.boost_lr if boosting else lr.lr)
    n_rec, n_rep = (n for _, n in lr._sources)
    scale = m / max(1, cfg.batch - n_rec - n_rep)
    idx_rec = lr.recent.sample_indices(int(round(n_rec * scale)))
    idx_rep = lr.replay.sample_indices(int(round(n_rep * scale)))
    zb = np.concatenate([Z, lr.recent.z[idx_rec], lr.replay.z[idx_rep]])
    if lr.scaler is not None:
        lr.scaler.learn_many(Z)
        lr.scaler.transform_many(zb, out=zb)
    yb = np.concatenate([T, lr.recent.y[idx_rec], lr.replay.y[idx_rep]])
    tr.last_loss_of = (m + len(idx_rec), len(zb))
    steps = cfg.steps_per_label * cfg.boost_steps if boosting else cfg.steps_per_label
    s_chal = tr.step_arrays(zb, yb, first=m)
    for _ in range(steps - 1):
        tr.step_arrays(zb, yb, first=0)
    counters["train_steps"] += steps
    if len(idx_rep):
        lr._fade("replay", tr.last_loss)
    l_chal, e_chal = sample_losses(s_chal, T, lr.task)
    preq["challenger"].update_many(l_chal, e_chal)
    pro, rol = lr.pairs["promote"], lr.pairs["rollback"]
    for lc, lh, lg in zip(l_champ.tolist(), l_chal.tolist(), l_glob.tolist()):
        pro.add(lc, lh)
        if champion is not glob:
            rol.add(lc, lg)
    f = lr.fade  # the batch's rows, faded in as row by row
    w = _FADE ** np.arange(m - 1, -1, -1)
    f["new"] = _FADE**m * f["new"] + float(w @ e_chal)
    f["w_new"] = _FADE**m * f["w_new"] + float(w.sum())
    ws = _SLOW ** np.arange(m - 1, -1, -1)
    f["slow"] = _SLOW**m * f.get("slow", 0.0) + float(ws @ e_chal)
    f["w_slow"] = _SLOW**m * f.get("w_slow", 0.0) + float(ws.sum())
    lr.replay.add_many(Z, T)
    lr.recent.add_many(Z, T)
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
    return {"accepted": m, "served": s_champ, "drift": drift, "swap": swap}
