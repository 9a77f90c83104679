"""Calibration sources: a generator module inside the model folder, ``[calibration] file``,
and parity judged on windows held out from calibration."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from edge.errors import ModelError
from edge.serve import compile_model, parity
from edge.serve.calibration import calibration_windows, held_out_windows, split_file
from edge.serve.testing import make_tiny_model, synthetic_dataset
from edge.zoo import ModelFolder

CALIB_PY = '''"""The folder's own calibration module; it imports a sibling module of the folder."""
import numpy as np

import helpers_for_calib


def windows(n, seed=0):
    return helpers_for_calib.tones(n, seed)
'''
HELPER_PY = '''import numpy as np

from edge.serve.testing import synthetic_dataset


def tones(n, seed):
    return synthetic_dataset(n, seed + 7)[0]
'''


def _with_calibration(model, line: str) -> ModelFolder:
    mp = model.path / "manifest.toml"
    mp.write_text(mp.read_text().replace('generator = "edge.serve.testing:calibration_windows"', line))
    return ModelFolder(model.path)


def _rows(x):
    return {r.tobytes() for r in x}


def test_a_generator_module_inside_the_model_folder_is_importable(tmp_path):
    model = make_tiny_model(tmp_path / "m", name="ownmodule")
    (model.path / "calib.py").write_text(CALIB_PY)
    (model.path / "helpers_for_calib.py").write_text(HELPER_PY)
    model = _with_calibration(model, 'generator = "calib:windows"')

    r = compile_model(model, backend="onnxruntime", precision="int8", cache_dir=tmp_path / "c", progress=False)

    assert r.parity.passed and r.cache == "miss"
    assert str(model.path) not in sys.path, "the model folder must be on sys.path only while its module executes"
    assert "calib" not in sys.modules and "helpers_for_calib" in sys.modules
    np.testing.assert_array_equal(calibration_windows(model, n=4), synthetic_dataset(4, 7)[0])


def test_a_missing_generator_module_says_which_and_where(tmp_path):
    model = _with_calibration(make_tiny_model(tmp_path / "m", name="nomodule"), 'generator = "nosuch:windows"')

    with pytest.raises(ModelError, match=r"calibration.generator 'nosuch:windows' cannot be loaded: ModuleNotFoundError"):
        calibration_windows(model)


@pytest.mark.parametrize("n", [3, 40, 300, 1000])
def test_a_file_is_split_into_calibration_and_held_out_windows_that_never_overlap(n):
    calib, held = split_file(n)

    assert calib.stop <= held.start and held.stop == n and held.stop - held.start >= 1 and calib.stop >= 1


def test_parity_with_a_calibration_file_uses_held_out_windows(tmp_path):
    model = make_tiny_model(tmp_path / "m", name="fromfile")
    x, _ = synthetic_dataset(300, seed=11)
    np.save(tmp_path / "rec.npy", x)

    cal = calibration_windows(model, tmp_path / "rec.npy")
    golden = parity.Golden.make(model, calibration_file=tmp_path / "rec.npy")

    assert len(cal) + len(golden.inputs["simulated"]) == 300
    assert not _rows(cal) & _rows(golden.inputs["simulated"])
    assert "held out" in golden.source


def test_the_manifest_calibration_file_is_used_and_held_out_too(tmp_path):
    model = make_tiny_model(tmp_path / "m", name="manifestfile")
    np.savez(model.path / "recorded.npz", X=synthetic_dataset(200, seed=12)[0])
    model = _with_calibration(model, 'file = "recorded.npz"')

    r = compile_model(model, backend="onnxruntime", precision="int8", cache_dir=tmp_path / "c", progress=False)
    held, source = held_out_windows(model, None, parity.N_SIMULATED, parity.GOLDEN_SEED)

    assert r.parity.passed and r.parity.per_set["simulated"]["n"] == len(held) == 66
    assert not _rows(calibration_windows(model)) & _rows(held) and source.startswith("recorded.npz[134:200]")


def test_generator_golden_windows_are_drawn_with_another_seed_than_calibration(tmp_path):
    model = make_tiny_model(tmp_path / "m", name="gen")

    golden = parity.Golden.make(model)

    assert not _rows(calibration_windows(model)) & _rows(golden.inputs["simulated"])
    assert "calibration uses seed 0" in golden.source


from hypothesis import given, strategies as st  # noqa: E402


@given(n=st.integers(2, 100_000), n_calib=st.integers(1, 5_000), n_golden=st.integers(1, 500))
def test_split_file_never_overlaps_and_never_comes_up_empty(n, n_calib, n_golden):
    calib, held = split_file(n, n_calib=n_calib, n_golden=n_golden)

    assert 0 == calib.start < calib.stop <= held.start < held.stop == n
    assert calib.stop - calib.start <= n_calib and held.stop - held.start <= n_golden
