"""The per-label training step of a linear head, compiled: forward, loss gradient, anchor
and Adam in one call.

Why a second copy of the step: on the narrow streams (6-20 features, 16 rows) the numpy
step (``HeadTrainer.step_arrays`` + ``AdamState.update``) is about 30 numpy calls of
0.3-1 microseconds each around well under a microsecond of arithmetic; one compiled call
does the same arithmetic for about what two numpy calls cost (BENCHMARKS.md, "Per-row
speed"). The rule is the numpy step's, which stays the reference and the fallback: the
numpy step is held to torch autograd + ``torch.optim.Adam`` and this kernel to both
(``tests/test_adapt_kernels.py``). The Adam scalars (bias corrections folded in, decay)
come from ``AdamState.advance``, the one place that computes them for both.

``welford_one`` is ``OnlineScaler.learn_one`` compiled the same way (ten numpy calls a
row in numpy).

Scope of the step: a ``LinearHead`` (``kind == "linear"``: the library's ``LinearModel`` and the
daemon's default head) under Adam or AdamW. Low-rank and MLP heads, SGD and torch
modules take the numpy (or autograd) path.

numba is an install requirement; where it cannot be imported (a platform without its
wheels) ``AVAILABLE`` is False, the reason is logged once, and every head takes the
numpy path: slower, the same rule. ``nogil=True``: while a step runs, the serving
thread is not held up by the GIL.
"""
from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger("edge.adapt")

MODE_REGRESSION, MODE_SOFTMAX, MODE_BINARY = 0, 1, 2

try:
    from numba import njit
except ImportError as e:  # a soft dependency in practice: the numpy step is the same rule
    njit = None
    UNAVAILABLE_REASON = f"numba cannot be imported ({e}); pip install numba for the compiled step"
else:
    UNAVAILABLE_REASON = ""

AVAILABLE = njit is not None
_warned = False


def warn_unavailable_once() -> None:
    """Log, once a process, that heads train on the numpy path (and what to install)."""
    global _warned
    if not _warned and not AVAILABLE:
        _warned = True
        log.warning("adapt: %s", UNAVAILABLE_REASON)


def _linear_adam_step(flat, k, d, z, yc, yr, n, mode, off, anchor, base_w, base_b, grad, m, v, hp, first, s0, a, b):
    """One step on rows ``z[:n]``; writes row ``i < first``'s scores into ``s0[i]``; returns
    the mean error of rows ``a..b`` (0/1 error, or mean absolute error) or NaN.

    ``flat`` = ``[W (k x d) row-major, bias (k)]``; ``yc`` class indices (modes 1, 2) or
    ``yr [n, k]`` targets (mode 0); ``off`` the logit offset (length 0: none; mode 2
    reads ``off[1] - off[0]``); ``hp`` = ``[step, eps_hat, shrink, l2, beta1, beta2]``
    (``AdamState.advance``). Scores and errors are of the plain logits, the loss's
    gradient of logits + offset (``HeadTrainer.step_arrays``)."""
    nw = k * d
    npar = nw + k
    for j in range(npar):
        grad[j] = 0.0
    logit = np.empty(k, np.float64)
    has_off = off.shape[0] > 0
    boff = 0.0
    if has_off and mode == MODE_BINARY:
        boff = off[1] - off[0]
    wrong = 0.0
    for i in range(n):
        for c in range(k):
            acc = np.float64(flat[nw + c])
            for j in range(d):
                acc += np.float64(flat[c * d + j]) * z[i, j]
            logit[c] = acc
        take = i >= a and i < b
        if mode == MODE_BINARY:
            x = logit[0]
            if i < first:
                p = 1.0 / (1.0 + math.exp(-min(60.0, max(-60.0, x))))
                s0[i, 0] = 1.0 - p
                s0[i, 1] = p
            if take and (x >= 0.0) != (yc[i] == 1):
                wrong += 1.0
            xo = min(60.0, max(-60.0, x + boff))
            logit[0] = (1.0 / (1.0 + math.exp(-xo)) - yc[i]) / n
        elif mode == MODE_SOFTMAX:
            best = 0
            for c in range(1, k):
                if logit[c] > logit[best]:
                    best = c
            if take and best != yc[i]:
                wrong += 1.0
            if i < first:
                _softmax_row(logit, s0, i, k, logit[best])
            if has_off:
                for c in range(k):
                    logit[c] += off[c]
            mx = logit[0]
            for c in range(1, k):
                mx = max(mx, logit[c])
            tot = 0.0
            for c in range(k):
                logit[c] = math.exp(logit[c] - mx)
                tot += logit[c]
            for c in range(k):
                logit[c] = (logit[c] / tot - (1.0 if c == yc[i] else 0.0)) / n
        else:
            for c in range(k):
                if i < first:
                    s0[i, c] = logit[c]
                e = logit[c] - yr[i, c]
                if take:
                    wrong += abs(e)
                logit[c] = 2.0 * e / (n * k)
        for c in range(k):
            gc = logit[c]
            if gc != 0.0:
                for j in range(d):
                    grad[c * d + j] += gc * z[i, j]
                grad[nw + c] += gc
    if anchor != 0.0:  # no work for a zero anchor
        two = 2.0 * anchor
        for c in range(k):
            for j in range(d):
                grad[c * d + j] += two * (flat[c * d + j] - base_w[c, j])
            grad[nw + c] += two * (flat[nw + c] - base_b[c])
    _adam(flat, grad, m, v, hp, npar)
    if b <= a:
        return math.nan
    return wrong / ((b - a) * (k if mode == MODE_REGRESSION else 1))


def _gather(zb, ycb, yrb, row, src_z, src_yc, src_yr, idx, reg, k, d):
    """Copy rows ``idx`` of a buffer (``src_z``, ``src_yc`` or ``src_yr``) into ``zb`` / ``ycb`` or
    ``yrb`` from ``row`` on; returns the next free row."""
    for q in range(idx.shape[0]):
        src = idx[q]
        for j in range(d):
            zb[row, j] = src_z[src, j]
        if reg:
            for c in range(k):
                yrb[row, c] = src_yr[src, c]
        else:
            ycb[row] = src_yc[src]
        row += 1
    return row


def _scale_rows(zb, n, d, mean32, inv32):
    """The scaler's transform, ``(z - mean32) * inv32`` in float32, of rows ``0..n-1``."""
    for i in range(n):
        for j in range(d):
            zb[i, j] = (zb[i, j] - mean32[j]) * inv32[j]


def _fill_step(flat, k, d, zb, ycb, yrb, z0, y0c, y0r, rz, ryc, ryr, ri, pz, pyc, pyr, pi, scale, mean32, inv32,
               mode, off, anchor, base_w, base_b, grad, m, v, hp, s0, a, b):
    """``HeadTrainer.fill`` + the scaler's transform + ``_linear_adam_step``, in one call: row 0 of
    ``zb`` / ``ycb`` (or ``yrb``) = the new row ``z0`` / ``y0c`` (or ``y0r``), then the rows
    ``ri`` of the recent buffer (``rz``, ``ryc`` / ``ryr``) and ``pi`` of the reservoir, each
    row scaled ``(z - mean32) * inv32`` when ``scale``; then one step on them. Returns the
    step's value (the mean error of rows ``a..b``, or NaN); the rows filled are ``1 + len(ri) + len(pi)``."""
    reg = mode == MODE_REGRESSION
    for j in range(d):
        zb[0, j] = z0[j]
    if reg:
        for c in range(k):
            yrb[0, c] = y0r[c]
    else:
        ycb[0] = y0c
    row = _gather(zb, ycb, yrb, 1, rz, ryc, ryr, ri, reg, k, d)
    n = _gather(zb, ycb, yrb, row, pz, pyc, pyr, pi, reg, k, d)
    if scale:
        _scale_rows(zb, n, d, mean32, inv32)
    return _linear_adam_step(flat, k, d, zb, ycb, yrb, n, mode, off, anchor, base_w, base_b, grad, m, v, hp, 1, s0, a, b)


def _fill_step_many(flat, k, d, zb, ycb, yrb, Z0, Y0c, Y0r, rz, ryc, ryr, ri, pz, pyc, pyr, pi, scale, mean32, inv32,
                    mode, off, anchor, base_w, base_b, grad, m, v, hp, s0, a, b):
    """``_fill_step`` for a batch of new rows ``Z0 [m0, D]`` (``Y0c [m0]`` or ``Y0r [m0, K]``) first,
    whose scores before the step go to ``s0 [m0, ...]`` (``learn_many``)."""
    reg = mode == MODE_REGRESSION
    m0 = Z0.shape[0]
    for i in range(m0):
        for j in range(d):
            zb[i, j] = Z0[i, j]
        if reg:
            for c in range(k):
                yrb[i, c] = Y0r[i, c]
        else:
            ycb[i] = Y0c[i]
    row = _gather(zb, ycb, yrb, m0, rz, ryc, ryr, ri, reg, k, d)
    n = _gather(zb, ycb, yrb, row, pz, pyc, pyr, pi, reg, k, d)
    if scale:
        _scale_rows(zb, n, d, mean32, inv32)
    return _linear_adam_step(flat, k, d, zb, ycb, yrb, n, mode, off, anchor, base_w, base_b, grad, m, v, hp, m0, s0, a, b)


def _betting_many(state, champion_losses, challenger_losses, margin, scale, bound, cap, half_life):
    """``BettingTest.update`` for each pair in turn, on ``state`` = ``[n, log_wealth, mu, var,
    sum_a, sum_b, sum_c]`` (float64, updated in place): the same float64 operations in the
    same order, so the same result as the Python loop (``learn_many``: a batch's labels)."""
    n, lw, mu, var = state[0], state[1], state[2], state[3]
    sa, sb, sc = state[4], state[5], state[6]
    ms = margin / scale
    top = cap / (bound + ms)
    for i in range(champion_losses.shape[0]):
        a_loss, b_loss = champion_losses[i], challenger_losses[i]
        d = (a_loss - b_loss) / scale
        c = bound if d > bound else -bound if d < -bound else d
        x = c - ms
        lam = mu / (var + mu * mu) if mu > 0.0 else 0.0
        if lam > top:
            lam = top
        if lam != 0.0:
            lw += math.log1p(lam * x)
        n += 1.0
        a = 1.0 / (n + 1.0) if n + 1.0 < half_life else 1.0 / half_life
        dev = x - mu
        mu = mu + a * dev
        var = (1.0 - a) * (var + a * dev * dev)
        sa += a_loss
        sb += b_loss
        sc += c
    state[0], state[1], state[2], state[3] = n, lw, mu, var
    state[4], state[5], state[6] = sa, sb, sc


def _guard_many(buf, start, length, flags, state, window, warmup, share, ratio, history_weight):
    """``LabelGuard.observe`` for each flag in turn: the recent window is the ring ``buf``
    (``length`` flags from ``start``), ``state`` = ``[hits, seen, history, tripped]`` (float64,
    updated in place). Returns the ring's new start and length. The same float64 operations
    in the same order as the Python rule (``learn_many``: a batch's labels)."""
    hits, seen, history, tripped = state[0], state[1], state[2], state[3] > 0.0
    need = window if window < 20 else 20
    for i in range(flags.shape[0]):
        c = 1.0 if flags[i] else 0.0
        evicted = -1.0
        if length == window:
            evicted = 1.0 if buf[start] else 0.0
            hits -= evicted
            start = start + 1 if start + 1 < window else 0
            length -= 1
        pos = start + length
        if pos >= window:
            pos -= window
        buf[pos] = flags[i]
        length += 1
        hits += c
        seen += 1.0
        r = hits / length
        tripped = seen >= warmup and length >= need and r > share and r > ratio * history
        if evicted >= 0.0 and not tripped:
            history += history_weight * (evicted - history)
    state[0], state[1], state[2], state[3] = hits, seen, history, 1.0 if tripped else 0.0
    return start, length


def _softmax_row(logit, s0, i, k, mx):
    tot = 0.0
    for c in range(k):
        tot += math.exp(logit[c] - mx)
    for c in range(k):
        s0[i, c] = math.exp(logit[c] - mx) / tot


def _adam(flat, grad, m, v, hp, npar):
    """``AdamState.update``'s rule, element by element (float32 state, as torch's)."""
    step, eps_hat, shrink, l2, b1, b2 = hp[0], hp[1], hp[2], hp[3], hp[4], hp[5]
    for j in range(npar):
        p = np.float64(flat[j])
        if shrink != 1.0:
            p = np.float64(np.float32(p * shrink))
        g = np.float64(np.float32(grad[j]))
        if l2 != 0.0:
            g = np.float64(np.float32(g + l2 * p))
        mj = np.float32(m[j] + (g - m[j]) * (1.0 - b1))
        vj = np.float32(v[j] * b2 + (1.0 - b2) * g * g)
        m[j] = mj
        v[j] = vj
        flat[j] = np.float32(p - step * mj / (math.sqrt(vj) + eps_hat))


def _welford_one(z, mean, m2, n, mean32, inv32):
    """``OnlineScaler.learn_one``'s update (``n`` counts ``z``), with its float32 views."""
    for j in range(mean.shape[0]):
        x = np.float64(z[j])
        dj = x - mean[j]
        mean[j] += dj / n
        m2[j] += dj * (x - mean[j])
        mean32[j] = mean[j]
        var = m2[j] / n
        inv32[j] = 1.0 if var <= 1e-24 else 1.0 / math.sqrt(var)


if AVAILABLE:
    welford_one = njit(nogil=True, cache=True)(_welford_one)
    _softmax_row = njit(nogil=True, cache=True)(_softmax_row)
    _adam = njit(nogil=True, cache=True)(_adam)
    _linear_adam_step = linear_adam_step = njit(nogil=True, cache=True)(_linear_adam_step)
    _gather = njit(nogil=True, cache=True)(_gather)
    _scale_rows = njit(nogil=True, cache=True)(_scale_rows)
    fill_step = njit(nogil=True, cache=True)(_fill_step)
    fill_step_many = njit(nogil=True, cache=True)(_fill_step_many)
    betting_many = njit(nogil=True, cache=True)(_betting_many)
    guard_many = njit(nogil=True, cache=True)(_guard_many)
else:
    linear_adam_step = welford_one = fill_step = fill_step_many = betting_many = guard_many = None

_warmed = False


def warm() -> None:
    """Load (or compile) both kernels now, once a process, on arrays of the types the trainer
    and the scaler pass. Why: the first call costs about 0.5 s (numba's cache load, or a
    compile); made inside a step, the learner would charge it to its training budget as CPU
    time and skip the first labels' steps, by an amount that depends on the machine's load.
    ``HeadTrainer`` calls this when it takes the compiled path, before any budget clock runs."""
    global _warmed
    if _warmed or not AVAILABLE:
        return
    _warmed = True
    f32, i64, f64 = np.float32, np.int64, np.float64
    k, d, n = 1, 2, 2
    flat, z = np.zeros(k * d + k, f32), np.zeros((n, d), f32)
    s0 = np.empty((1, 2), f32)
    linear_adam_step(flat, k, d, z, np.zeros(n, i64), np.zeros((0, k), f32), n, MODE_BINARY, np.zeros(0, f32), 0.0,
                     np.zeros((k, d), f32), np.zeros(k, f32), np.zeros(flat.size, f64), np.zeros(flat.size, f32),
                     np.zeros(flat.size, f32), np.array([0.0, 1e-8, 1.0, 0.0, 0.9, 0.999], f64), 1, s0, 0, 0)
    welford_one(np.zeros(d, f32), np.zeros(d, f64), np.zeros(d, f64), 1, np.zeros(d, f32), np.ones(d, f32))
    betting_many(np.zeros(7, f64), np.zeros(1, f64), np.zeros(1, f64), 0.0, 1.0, 1.0, 0.7, 20.0)
    guard_many(np.zeros(4, np.bool_), 0, 0, np.zeros(1, np.bool_), np.zeros(4, f64), 4, 0, 0.5, 10.0, 1e-3)
    for y0r, yb_c, yb_r, src_c, src_r, mode in ((np.zeros(0, f32), np.zeros(n, i64), np.zeros((0, k), f32),
                                                 np.zeros(n, i64), np.zeros((0, k), f32), MODE_BINARY),
                                                (np.zeros(k, f32), np.zeros(0, i64), np.zeros((n, k), f32),
                                                 np.zeros(0, i64), np.zeros((n, k), f32), MODE_REGRESSION)):
        idx = np.zeros(1, i64)
        y0c = np.zeros(0 if mode == MODE_REGRESSION else 1, i64)
        fill_step_many(flat, k, d, np.zeros((n, d), f32), yb_c, yb_r, z[:1], y0c, y0r.reshape(-1, k)[:1] if len(y0r) else
                       np.zeros((0, k), f32), z, src_c, src_r, idx, z, src_c, src_r, idx[:0], True, np.zeros(d, f32),
                       np.ones(d, f32), mode, np.zeros(0, f32), 0.0, np.zeros((k, d), f32), np.zeros(k, f32),
                       np.zeros(flat.size, f64), np.zeros(flat.size, f32), np.zeros(flat.size, f32),
                       np.array([0.0, 1e-8, 1.0, 0.0, 0.9, 0.999], f64), s0, 0, 0)
        fill_step(flat, k, d, np.zeros((n, d), f32), yb_c, yb_r, np.zeros(d, f32), 0, y0r, z, src_c, src_r, idx, z, src_c,
                  src_r, idx[:0], True, np.zeros(d, f32), np.ones(d, f32), mode, np.zeros(0, f32), 0.0,
                  np.zeros((k, d), f32), np.zeros(k, f32), np.zeros(flat.size, f64), np.zeros(flat.size, f32),
                  np.zeros(flat.size, f32), np.array([0.0, 1e-8, 1.0, 0.0, 0.9, 0.999], f64), s0, 0, 0)
