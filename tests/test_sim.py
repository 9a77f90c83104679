"""edge.sim: determinism, shapes, stream continuity, fault signatures, documented shifts."""
from __future__ import annotations

import numpy as np
import pytest

from edge import sim

FS = 1000.0


def _amp_at(X: np.ndarray, hz: float, fs: float = FS) -> np.ndarray:
    """Mean spectral amplitude [axis] at ``hz`` over windows X [N, 3, L] (Hann, DC removed)."""
    L = X.shape[-1]
    spec = np.abs(np.fft.rfft((X - X.mean(-1, keepdims=True)) * np.hanning(L), axis=-1))
    f = np.fft.rfftfreq(L, 1 / fs)
    band = np.abs(f - hz) <= 4.0
    return spec[..., band].max(-1).mean(0)


@pytest.fixture(scope="module")
def by_class():
    X, y = sim.make_dataset(800, seed=11, window=1024)
    return {name: X[y == k] for k, name in enumerate(sim.FAULTS)}


def test_make_dataset_is_deterministic_by_seed():
    a, ya = sim.make_dataset(64, seed=3)
    b, yb = sim.make_dataset(64, seed=3)
    c, _ = sim.make_dataset(64, seed=4)
    assert np.array_equal(a, b) and np.array_equal(ya, yb)
    assert not np.allclose(a, c)


def test_make_dataset_shapes_dtypes_and_balance():
    X, y = sim.make_dataset(100, seed=0, window=128, faults=("normal", "imbalance"))
    assert X.shape == (100, 3, 128) and X.dtype == np.float32 and X.flags.c_contiguous
    assert y.dtype == np.int64 and np.bincount(y).tolist() == [50, 50]
    assert np.isfinite(X).all()


def test_calibration_windows_are_nominal_and_seeded():
    X = sim.calibration_windows(32, seed=1)
    assert X.shape == (32, 3, 256) and X.dtype == np.float32
    assert np.array_equal(X, sim.calibration_windows(32, seed=1))


def test_machine_is_deterministic_and_chunk_invariant():
    whole_t, whole = sim.Machine(seed=5, fault="bearing_wear").read(3000)
    m = sim.Machine(seed=5, fault="bearing_wear")
    parts = [m.read(n) for n in (1, 999, 7, 1993)]
    assert np.allclose(np.concatenate([p[1] for p in parts]), whole, atol=1e-5)
    assert np.allclose(np.concatenate([p[0] for p in parts]), whole_t)
    assert whole.dtype == np.float32 and whole_t.dtype == np.float64 and whole.shape == (3000, 3)


def test_machine_times_start_at_t0_and_continue():
    m = sim.Machine(seed=1, t0=1_700_000_000.0)
    t1, _ = m.read(10)
    t2, _ = m.read(10)
    assert t1[0] == 1_700_000_000.0
    assert np.allclose(np.diff(np.concatenate([t1, t2])), 1 / FS, rtol=0, atol=1e-6)


def test_speed_change_mid_stream_keeps_phase_continuous():
    quiet = sim.Condition(noise=0.0)
    m = sim.Machine(seed=2, fault="imbalance", condition=quiet)
    _, a = m.read(500)
    m.condition = sim.Condition(noise=0.0, speed_hz=26.0)  # amplitude changes little; a phase jump would show
    _, b = m.read(500)
    step = np.abs(b[0] - a[-1])
    typical = np.abs(np.diff(a, axis=0)).max(0)
    assert (step <= 1.5 * typical + 1e-3).all()


def test_reassigning_the_same_condition_leaves_the_stream_unchanged():
    whole = sim.Machine(seed=9, fault="imbalance").read(600)[1]
    m = sim.Machine(seed=9, fault="imbalance")
    a = m.read(300)[1]
    m.condition = sim.Condition()
    assert np.allclose(np.concatenate([a, m.read(300)[1]]), whole, atol=1e-5)


def test_fault_can_be_injected_between_reads():
    m = sim.Machine(seed=8, condition=sim.Condition(noise=0.0))
    assert m.severity > 0.5
    _, before = m.read(2000)
    m.fault = "imbalance"
    _, after = m.read(2000)
    assert after[:, 0].std() > 1.5 * before[:, 0].std()
    with pytest.raises(ValueError, match="not one of"):
        m.fault = "broken"


def test_imbalance_has_strong_radial_1x(by_class):
    imb, nor = _amp_at(by_class["imbalance"], 25.0), _amp_at(by_class["normal"], 25.0)
    assert imb[0] > 3 * nor[0] and imb[1] > 2 * nor[1]
    assert imb[2] < imb[0]  # radial, not axial


def test_misalignment_has_2x_3x_and_axial(by_class):
    mis, nor = by_class["misalignment"], by_class["normal"]
    assert _amp_at(mis, 50.0)[0] > 4 * _amp_at(nor, 50.0)[0]
    assert _amp_at(mis, 75.0)[0] > 2 * _amp_at(nor, 75.0)[0]
    assert _amp_at(mis, 50.0)[2] > 4 * _amp_at(nor, 50.0)[2]  # axial 2x


def test_bearing_wear_excites_the_resonance_band(by_class):
    def band_energy(X):
        spec = np.abs(np.fft.rfft(X - X.mean(-1, keepdims=True), axis=-1)) ** 2
        f = np.fft.rfftfreq(X.shape[-1], 1 / FS)
        return spec[..., (f > 170) & (f < 400)].sum(-1).mean()

    assert band_energy(by_class["bearing_wear"]) > 2 * band_energy(by_class["normal"])


def test_bearing_impacts_repeat_at_a_non_integer_order():
    m = sim.Machine(seed=8, fault="bearing_wear", condition=sim.Condition(noise=0.0))
    _, v = m.read(8192)
    env = np.abs(v[:, 1] - v[:, 1].mean())
    spec = np.abs(np.fft.rfft(env - env.mean()))
    f = np.fft.rfftfreq(env.size, 1 / FS)
    sel = (f > 40) & (f < 160)
    order = f[sel][spec[sel].argmax()] / sim.NOMINAL_SPEED_HZ
    assert 2.8 < order < 5.8 and abs(order - round(order)) > 0.08


def test_gain_and_offset_act_as_documented():
    X0, _ = sim.make_dataset(200, seed=6)
    X1, _ = sim.make_dataset(200, seed=6, condition=sim.Condition(gain=(2.0, 1.0, 1.0), offset=(0.0, 0.0, 0.5)))
    assert np.allclose(X1[:, 0], 2 * X0[:, 0], atol=1e-5)
    assert np.allclose(X1[:, 2], X0[:, 2] + 0.5, atol=1e-5)


def test_speed_moves_the_1x_line():
    X, _ = sim.make_dataset(200, seed=6, window=1024, faults=("imbalance",), condition=sim.SHIFTS["speed"])
    assert _amp_at(X, 36.0)[0] > 3 * _amp_at(X, 25.0)[0]


def test_mounting_moves_radial_motion_into_the_axial_channel():
    kw = dict(seed=6, window=1024, faults=("imbalance",))
    z0 = _amp_at(sim.make_dataset(200, **kw)[0], 25.0)[2]
    z1 = _amp_at(sim.make_dataset(200, condition=sim.SHIFTS["mounting"], **kw)[0], 25.0)[2]
    assert z1 > 2 * z0


def test_noise_condition_raises_the_noise_floor():
    def floor(c):
        X, _ = sim.make_dataset(200, seed=6, faults=("normal",), condition=c)
        return np.diff(X, axis=-1).std()

    assert floor(sim.SHIFTS["noise"]) > 1.8 * floor(sim.SHIFTS["nominal"])


def test_gradual_drift_grows_the_gain_over_time():
    m = sim.Machine(seed=3, fault="imbalance", condition=sim.SHIFTS["gradual"])
    _, early = m.read(2000)
    m.read(298_000)
    _, late = m.read(2000)
    ratio = late[:, 0].std() / early[:, 0].std()
    assert 1.3 < ratio < 1.6  # 1 + 0.0015/s * 300 s


def test_shifts_cover_the_documented_names():
    assert {"nominal", "gain_offset", "speed", "mounting", "noise", "gradual"} <= set(sim.SHIFTS)
    assert sim.SHIFTS["nominal"] == sim.Condition()


def test_process_sim_is_seeded_and_continuous():
    a = sim.ProcessSim(seed=1)
    b = sim.ProcessSim(seed=1)
    ta, va = a.read(500)
    tb, vb = b.read(500)
    assert np.array_equal(va, vb) and va.shape == (500, 1) and va.dtype == np.float32
    t2, v2 = a.read(500)
    assert np.allclose(np.diff(np.concatenate([ta, t2])), 0.1)
    assert abs(float(v2[0, 0] - va[-1, 0])) < 5.0


def test_process_shift_gain_offset_changes_the_level():
    base = sim.ProcessSim(seed=2).read(3000)[1]
    shifted = sim.ProcessSim(seed=2, condition=sim.PROCESS_SHIFTS["gain_offset"]).read(3000)[1]
    assert np.allclose(shifted, 1.4 * base + 12.0, atol=1e-3)


def test_forecast_dataset_targets_continue_the_window():
    X, Y = sim.make_forecast_dataset(256, seed=0, window=32, horizon=5)
    assert X.shape == (256, 1, 32) and Y.shape == (256, 5)
    assert X.dtype == np.float32 and Y.dtype == np.float32
    assert np.abs(Y[:, 0] - X[:, 0, -1]).mean() < 1.0  # the future starts where the past ends
    X2, Y2 = sim.make_forecast_dataset(256, seed=0, window=32, horizon=5)
    assert np.array_equal(X, X2) and np.array_equal(Y, Y2)
