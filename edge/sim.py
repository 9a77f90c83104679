"""Simulated sensors: a 3-axis accelerometer on a rotating machine, and a slow process.

The stand-in for a plant we cannot bring here (DESIGN.md, "Simulated sensors"). It is
meant to be hard enough to be honest: machines differ (severity, resonance, orbit
shape, residual imbalance), the shaft speed wanders, the noise is coloured and the
stream has occasional spikes, so a good small model is accurate but not perfect on
nominal data, and every shift in ``SHIFTS`` costs a frozen model a clear drop.

Axes, in the machine frame: x radial horizontal, y radial vertical (gravity, 1 g),
z axial (along the shaft). Units are g. Fault signatures follow the textbook:

* normal: a small residual 1x (and 2x) radial component over broadband noise;
* imbalance: a strong 1x radial orbit, growing with speed squared (centrifugal force);
* misalignment: 2x and 3x harmonics, and a marked axial (z) 1x/2x component;
* bearing_wear: impulses at a bearing defect frequency (a non-integer multiple of the
  shaft speed: 3.15-3.75x for an outer-race defect, 5.15-5.75x for an inner race, which is
  also amplitude-modulated at 1x) ringing a structural resonance at 180-380 Hz.

Everything here is pure (no I/O) and seeded. ``Machine.read`` is chunk-invariant:
reading 100 + 100 samples gives the same stream as reading 200, because randomness is
drawn per sample index (counter-based blocks) and state is only the shaft phase.

>>> X, y = make_dataset(8, seed=1)
>>> X.shape, X.dtype, y.tolist()
((8, 3, 256), dtype('float32'), [3, 0, 2, 1, 0, 3, 2, 1])
>>> t, v = Machine(seed=3, fault="imbalance").read(5)
>>> t.tolist(), v.shape
([0.0, 0.001, 0.002, 0.003, 0.004], (5, 3))
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

FAULTS = ("normal", "imbalance", "misalignment", "bearing_wear")
NOMINAL_SPEED_HZ = 25.0
_HIST = 32  # samples of history feeding the FIR filters (ringing, coloured noise)
_BLOCK = 4096  # counter-based randomness: one generator per block of sample indices
_N_INNOV = 11  # per-sample innovations: 3 sensor noise, 3 structural, 1 impulse, 3 spike, 1 uniform
_SPIKE_RATE_HZ = 0.4
_NOISE_KERNEL = np.r_[0.6, 0.8 * np.exp(-np.arange(1, _HIST) / 6.0)]
_NOISE_KERNEL = _NOISE_KERNEL / np.linalg.norm(_NOISE_KERNEL)  # unit gain on the std


def _per_axis(v: float | tuple[float, ...]) -> np.ndarray:
    a = np.broadcast_to(np.asarray(v, dtype=np.float64), (3,))
    return a.copy()


@dataclass(frozen=True)
class Condition:
    """How the sensor and the machine are operated: the knobs a shift turns.

    ``gain`` (scalar or per-axis) is the sensor's sensitivity error, ``offset`` (g, per
    axis) its bias, ``speed_hz`` the shaft speed (faults scale with it: imbalance with
    speed squared), ``mounting_deg`` a rotation of the sensor about the vertical y axis (a
    magnet mount turned on top of the housing mixes horizontal radial and axial motion;
    gravity stays put, so only the vibration pattern betrays it), ``noise`` the std
    (g) of the coloured sensor noise, and ``drift_per_s`` a gradual relative gain drift
    per second since the condition was applied.

    >>> Condition(gain=1.5).speed_hz
    25.0
    """

    gain: float | tuple[float, float, float] = 1.0
    offset: float | tuple[float, float, float] = 0.0
    speed_hz: float = NOMINAL_SPEED_HZ
    mounting_deg: float = 0.0
    noise: float = 0.04
    drift_per_s: float = 0.0


SHIFTS: dict[str, Condition] = {
    "nominal": Condition(),
    "gain_offset": Condition(gain=(1.6, 0.7, 1.5), offset=(0.3, -0.2, 0.15)),
    "speed": Condition(speed_hz=36.0),
    "mounting": Condition(mounting_deg=60.0),
    "noise": Condition(noise=0.10),
    "gradual": Condition(drift_per_s=1.5e-3),
}


def _draw_machines(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Per-machine variation: why two 'imbalance' machines never look the same."""
    u = lambda lo, hi, *s: rng.uniform(lo, hi, (n, *s))  # noqa: E731
    inner = rng.random(n) < 0.5
    return {
        "speed_factor": u(0.97, 1.03), "wander": u(0.003, 0.012), "wander_hz": u(0.1, 0.5),
        "wander_ph": u(0, 2 * np.pi), "severity": u(0.0, 1.0),
        "resid1": 0.035 * rng.lognormal(0.0, 0.45, n), "resid2": 0.01 * rng.lognormal(0.0, 0.5, n),
        "ellipse": u(0.5, 1.0), "axial_normal": u(0.05, 0.25), "axial_mis": u(0.4, 1.0),
        "ratio3": u(0.2, 0.6), "harm_ph": u(0, 2 * np.pi, 3, 3), "struct": u(0.01, 0.03),
        "defect_ratio": np.where(inner, u(5.15, 5.75), u(3.15, 3.75)), "mod_depth": np.where(inner, u(0.4, 0.8), 0.0),
        "res_hz": u(180.0, 380.0), "res_tau": u(0.003, 0.008),
        "imp_dir": np.abs(rng.normal(0, 1, (n, 3))) * [1.0, 1.0, 0.5], "slip_ph": u(0, 2 * np.pi),
    }


def _psi(p: dict[str, np.ndarray], tau: np.ndarray) -> np.ndarray:
    """Shaft revolutions per nominal-speed second: the integral of the wandering speed."""
    f, a, ph = (p[k][:, None] for k in ("wander_hz", "wander", "wander_ph"))
    return p["speed_factor"][:, None] * (tau + a / (2 * np.pi * f) * (np.sin(2 * np.pi * f * tau + ph) - np.sin(ph)))


def _fir(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Causal FIR over the last axis (h [K] shared, or [N, K] per row); drops K-1 history samples."""
    k = h.shape[-1]
    n = x.shape[-1] - k + 1
    out = np.zeros(x.shape[:-1] + (n,))
    for j in range(k):
        hj = h[..., j, None] if h.ndim > 1 else h[j]
        out += hj * x[..., k - 1 - j:k - 1 - j + n]
    return out


def _render(p: dict, fault: np.ndarray, cond: Condition, phi: np.ndarray, tau: np.ndarray,
            t_drift: np.ndarray, z: np.ndarray, fs: float) -> np.ndarray:
    """Samples [N, n, 3] from phases/times [N, _HIST + n] that include _HIST history samples."""
    n_rows, m = phi.shape
    sp = cond.speed_hz / NOMINAL_SPEED_HZ
    sev = p["severity"]
    is_ = lambda name: (fault == FAULTS.index(name)).astype(np.float64)  # noqa: E731
    a1 = (p["resid1"] + is_("imbalance") * (0.02 + 0.3 * sev)) * sp**2
    a2 = (p["resid2"] + is_("misalignment") * (0.015 + 0.2 * sev)) * sp
    a3 = a2 * np.where(fault == FAULTS.index("misalignment"), p["ratio3"], 0.2)
    ax_frac = np.where(fault == FAULTS.index("misalignment"), p["axial_mis"], p["axial_normal"])
    amp = np.zeros((n_rows, 3, 3))  # [row, axis, harmonic]
    for k, a in enumerate((a1, a2, a3)):
        amp[:, 0, k], amp[:, 1, k], amp[:, 2, k] = a, a * p["ellipse"], a * ax_frac
    ph = p["harm_ph"].copy()
    ph[:, 1] = ph[:, 0] - np.pi / 2  # a rotating force: vertical lags horizontal by 90 deg
    harm = np.arange(1, 4)[None, None, :, None] * phi[:, None, None, :] + ph[..., None]
    sig = np.einsum("rak,rakn->ran", amp, np.cos(harm))  # [N, 3, m]
    # bearing: impulses when the defect phase crosses an integer, ringing the resonance
    cyc = p["defect_ratio"][:, None] * phi / (2 * np.pi) + 0.3 * np.sin(0.7 * 2 * np.pi * tau + p["slip_ph"][:, None])
    hit = np.diff(np.floor(cyc), axis=1, prepend=np.floor(cyc[:, :1])) > 0
    mod = 1.0 + p["mod_depth"][:, None] * np.cos(phi)
    imp_amp = (0.05 + 0.8 * sev) * sp * is_("bearing_wear")
    imp = hit * mod * (1.0 + 0.25 * z[:, 6]) * imp_amp[:, None]
    k = np.arange(_HIST) / fs
    ring = np.exp(-k / p["res_tau"][:, None]) * np.sin(2 * np.pi * p["res_hz"][:, None] * k)
    rung = _fir(imp, ring)  # [N, m - _HIST + 1]
    sig = sig[..., _HIST:]
    n = sig.shape[-1]
    d = p["imp_dir"] / np.linalg.norm(p["imp_dir"], axis=1, keepdims=True)
    sig = sig + d[:, :, None] * rung[:, None, -n:]
    sig = sig + p["struct"][:, None, None] * _fir(z[:, 3:6, 1:], _NOISE_KERNEL)
    sig[:, 1] += 1.0  # gravity
    c, s = math.cos(math.radians(cond.mounting_deg)), math.sin(math.radians(cond.mounting_deg))
    rot = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    out = np.einsum("ij,rjn->rin", rot, sig) + cond.noise * _fir(z[:, 0:3, 1:], _NOISE_KERNEL)
    spike = (z[:, 10, _HIST:] < _SPIKE_RATE_HZ / fs)[:, None, :] * z[:, 7:10, _HIST:] * 0.6
    gain = _per_axis(cond.gain)[None, :, None] * (1.0 + cond.drift_per_s * t_drift[:, None, _HIST:])
    out = gain * (out + spike) + _per_axis(cond.offset)[None, :, None]
    return out.transpose(0, 2, 1).astype(np.float32)


def _innovations(rng: np.random.Generator, n_rows: int, m: int) -> np.ndarray:
    z = rng.standard_normal((n_rows, _N_INNOV, m))
    z[:, 10] = rng.random((n_rows, m))  # the spike draw is uniform
    return z


class Machine:
    """One machine with its sensor, streaming samples; ``fault`` and ``condition`` can be
    changed between reads (to inject a fault or a drift mid-stream) without a phase jump.

    >>> m = Machine(seed=0, fault="misalignment")
    >>> a = np.concatenate([m.read(100)[1], m.read(156)[1]])
    >>> bool(np.allclose(a, Machine(seed=0, fault="misalignment").read(256)[1], atol=1e-5))
    True
    """

    def __init__(self, *, seed: int, sample_rate: float = 1000.0, condition: Condition = Condition(),
                 fault: str = "normal", t0: float = 0.0):
        self.seed, self.sample_rate, self.t0 = int(seed), float(sample_rate), float(t0)
        rng = np.random.default_rng([self.seed, 1])
        self._p = _draw_machines(rng, 1)
        self._i = 0
        self._phi_ref, self._psi_ref = float(rng.uniform(0, 2 * np.pi)), 0.0
        self._speed = condition.speed_hz
        self._blocks: dict[int, np.ndarray] = {}
        self.fault = fault
        self.condition = condition

    @property
    def fault(self) -> str:
        return self._fault

    @fault.setter
    def fault(self, name: str) -> None:
        if name not in FAULTS:
            raise ValueError(f"fault {name!r} is not one of {', '.join(FAULTS)}")
        self._fault = name

    @property
    def condition(self) -> Condition:
        return self._condition

    @condition.setter
    def condition(self, cond: Condition) -> None:
        # re-anchor the phase at the next sample so a speed change does not jump it
        self._phi_ref = float(self._phase(np.array([self._i]))[0, 0])
        self._psi_ref = float(_psi(self._p, np.array([self._i / self.sample_rate]))[0, 0])
        self._speed = cond.speed_hz
        self._i_set = self._i  # gradual drift counts from here
        self._condition = cond

    @property
    def samples_read(self) -> int:
        """How many samples ``read`` has returned so far (the index of the next one)."""
        return self._i

    @property
    def severity(self) -> float:
        """How strong this machine's fault is when it has one, in [0, 1]."""
        return float(self._p["severity"][0])

    def _phase(self, idx: np.ndarray) -> np.ndarray:
        psi = _psi(self._p, idx / self.sample_rate)
        return self._phi_ref + 2 * np.pi * self._speed * (psi - self._psi_ref)

    def _innov(self, idx: np.ndarray) -> np.ndarray:
        blocks = idx // _BLOCK
        for b in np.unique(blocks):
            if int(b) not in self._blocks:
                rng = np.random.default_rng([self.seed, 2, int(b) + 2**31])
                self._blocks[int(b)] = _innovations(rng, 1, _BLOCK)[0]
        self._blocks = {b: v for b, v in self._blocks.items() if b >= blocks[0]}
        return np.stack([self._blocks[int(b)][:, i] for b, i in zip(blocks, idx % _BLOCK)], axis=1) \
            if len(np.unique(blocks)) > 1 else self._blocks[int(blocks[0])][:, idx % _BLOCK]

    def read(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``n`` samples: times [n] float64 (s, from ``t0``) and values [n, 3] float32 (g)."""
        idx = np.arange(self._i - _HIST, self._i + n)
        phi = self._phase(idx[None])
        tau = idx[None] / self.sample_rate
        t_drift = (idx[None] - self._i_set) / self.sample_rate
        fault = np.array([FAULTS.index(self._fault)])
        v = _render(self._p, fault, self._condition, phi, tau, t_drift, self._innov(idx)[None], self.sample_rate)
        t = self.t0 + np.arange(self._i, self._i + n) / self.sample_rate
        self._i += n
        return t, v[0]


def make_dataset(n_windows: int, *, seed: int, condition: Condition = SHIFTS["nominal"], window: int = 256,
                 sample_rate: float = 1000.0, faults: tuple[str, ...] = FAULTS,
                 span_s: float = 600.0) -> tuple[np.ndarray, np.ndarray]:
    """Balanced, i.i.d. labelled windows: X [N, 3, window] float32, y [N] int64 (index into ``faults``).

    Each window comes from its own machine (severity, resonance, phase drawn afresh), at
    a random time in ``[0, span_s)`` after the condition was applied (so a gradual drift
    shows its spread of ages).

    >>> X, y = make_dataset(40, seed=0)
    >>> np.bincount(y).tolist()
    [10, 10, 10, 10]
    """
    rng = np.random.default_rng([int(seed), 3])
    y = rng.permutation(np.arange(n_windows) % len(faults)).astype(np.int64)
    fault = np.array([FAULTS.index(faults[k]) for k in y], dtype=np.int64)
    p = _draw_machines(rng, n_windows)
    start = rng.uniform(0.0, span_s, n_windows)
    phi0 = rng.uniform(0.0, 2 * np.pi, n_windows)
    tau = start[:, None] + np.arange(-_HIST, window)[None] / sample_rate
    phi = phi0[:, None] + 2 * np.pi * condition.speed_hz * (_psi(p, tau) - _psi(p, start[:, None]))
    z = _innovations(rng, n_windows, window + _HIST)
    X = _render(p, fault, condition, phi, tau, tau, z, sample_rate)
    return np.ascontiguousarray(X.transpose(0, 2, 1)), y


def calibration_windows(n: int = 256, seed: int = 0) -> np.ndarray:
    """Nominal windows of mixed classes [n, 3, 256] float32, for int8 calibration and golden inputs."""
    return make_dataset(n, seed=int(seed) + 10_007)[0]


@dataclass(frozen=True)
class ProcessCondition:
    """Knobs of the slow process stream: sensor ``gain``/``offset``, ``noise`` std, and the
    regime: ``tau_s`` (how fast the load follows its set point) and ``step_every_s`` (mean
    time between set-point steps).

    >>> PROCESS_SHIFTS["regime"].tau_s < ProcessCondition().tau_s
    True
    """

    gain: float = 1.0
    offset: float = 0.0
    noise: float = 0.5
    tau_s: float = 4.0
    step_every_s: float = 30.0


PROCESS_SHIFTS: dict[str, ProcessCondition] = {
    "nominal": ProcessCondition(),
    "gain_offset": ProcessCondition(gain=1.4, offset=12.0),
    "regime": ProcessCondition(tau_s=1.5, step_every_s=10.0),
    "noise": ProcessCondition(noise=1.5),
}


class ProcessSim:
    """A slow process value (motor load, % of rated) for forecasting: a duty cycle of a
    few minutes, random set-point steps followed with a first-order lag, and AR(1) noise.

    Its future is partly predictable (the lag, the cycle) and partly not (when the next
    step comes), so a forecaster beats persistence but not by everything.

    >>> t, v = ProcessSim(seed=0).read(3)
    >>> t.tolist(), v.shape, v.dtype
    ([0.0, 0.1, 0.2], (3, 1), dtype('float32'))
    """

    def __init__(self, *, seed: int, sample_rate: float = 10.0,
                 condition: ProcessCondition = ProcessCondition(), t0: float = 0.0):
        self.seed, self.sample_rate, self.t0 = int(seed), float(sample_rate), float(t0)
        self.condition = condition
        self._rng = np.random.default_rng([self.seed, 4])
        r = self._rng
        self._base, self._cyc_amp = r.uniform(45, 70), r.uniform(5, 15)
        self._cyc_s, self._cyc_ph, self._tau_f = r.uniform(90, 180), r.uniform(0, 2 * np.pi), r.uniform(0.7, 1.4)
        self._step, self._i, self._e = 0.0, 0, 0.0
        self._y = self._base + self._cyc_amp * math.sin(self._cyc_ph)

    def read(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``n`` samples: times [n] float64 (s) and values [n, 1] float32 (% load)."""
        c, dt = self.condition, 1.0 / self.sample_rate
        steps = self._rng.random(n) < dt / c.step_every_s
        levels = self._rng.uniform(-15, 15, n)
        w = self._rng.standard_normal(n)
        tt = np.arange(self._i, self._i + n) * dt
        target = self._base + self._cyc_amp * np.sin(2 * np.pi * tt / self._cyc_s + self._cyc_ph)
        alpha = 1.0 - math.exp(-dt / (c.tau_s * self._tau_f))
        a_e = math.exp(-dt / 0.5)  # measurement noise correlated over ~0.5 s
        out = np.empty(n)
        y, e, step = self._y, self._e, self._step
        for i in range(n):
            if steps[i]:
                step = float(levels[i])
            y += alpha * (target[i] + step - y)
            e = a_e * e + math.sqrt(1 - a_e * a_e) * c.noise * w[i]
            out[i] = y + e
        self._y, self._e, self._step = y, e, step
        self._i += n
        v = c.gain * out + c.offset
        return self.t0 + tt, v.astype(np.float32)[:, None]


def make_forecast_dataset(n: int, *, seed: int, window: int = 64, horizon: int = 10,
                          condition: ProcessCondition = ProcessCondition(), sample_rate: float = 10.0,
                          n_streams: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Forecast pairs from ``n_streams`` independent processes: X [n, 1, window] float32 (the past)
    and Y [n, horizon] float32 (the next ``horizon`` values of the same stream).

    >>> X, Y = make_forecast_dataset(16, seed=0)
    >>> X.shape, Y.shape
    ((16, 1, 64), (16, 10))
    """
    rng = np.random.default_rng([int(seed), 5])
    per = -(-n // n_streams)
    length = max(per * 8, 3000) + window + horizon  # enough room for sparse, varied windows
    Xs, Ys = [], []
    for s in range(n_streams):
        sim = ProcessSim(seed=int(rng.integers(2**31)), sample_rate=sample_rate, condition=condition)
        sim.read(int(rng.integers(200, 2000)))  # leave the start-up transient behind
        v = sim.read(length)[1][:, 0]
        starts = rng.choice(length - window - horizon, per, replace=False)
        Xs.append(np.stack([v[a:a + window] for a in starts])[:, None])
        Ys.append(np.stack([v[a + window:a + window + horizon] for a in starts]))
    X, Y = np.concatenate(Xs)[:n], np.concatenate(Ys)[:n]
    return X.astype(np.float32), Y.astype(np.float32)


def forecast_calibration_windows(n: int = 256, seed: int = 0) -> np.ndarray:
    """Nominal process windows [n, 1, 64] float32: calibration inputs of the forecast model."""
    return make_forecast_dataset(n, seed=int(seed) + 10_007)[0]


def eval_sets(n: int = 500, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Labelled check sets, one per condition of ``SHIFTS``: the vibration model's ``[eval] generator``.

    Seeds are offset from training (1, 1000+) and calibration (10_007+) seeds.

    >>> sets = eval_sets(8, seed=0)
    >>> sorted(sets) == sorted(SHIFTS), sets["nominal"][0].shape
    (True, (8, 3, 256))
    """
    return {name: make_dataset(n, seed=int(seed) + 20_011 + i, condition=cond)
            for i, (name, cond) in enumerate(SHIFTS.items())}
