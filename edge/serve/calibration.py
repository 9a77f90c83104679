"""Representative windows: for int8 calibration and for the parity gate's golden inputs.

They come from, in order: a file the user passes (``.npy`` array or ``.npz`` with one
array, of recorded windows ``[N, C, L]``), the manifest's ``[calibration] file``
(relative to the model folder) or its ``[calibration] generator`` (``module:function``
called as ``function(n, seed)``). Shapes are checked against the manifest, because a
calibration set of the wrong shape would otherwise fail deep inside the quantizer.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

import numpy as np

from edge.errors import ModelError

log = logging.getLogger("edge.serve")

CALIBRATION_N = 256


def load_windows_file(path: str | Path, model=None) -> np.ndarray:
    """Windows ``[N, C, L]`` float32 from a ``.npy`` or ``.npz`` file (key ``X``/``windows`` or the only array)."""
    p = Path(path).expanduser()
    try:
        data = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ModelError(f"{p}: cannot read calibration windows: {e}") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        names = list(data.files)
        name = next((n for n in ("X", "windows", "x") if n in names), names[0] if len(names) == 1 else None)
        if name is None:
            raise ModelError(f"{p}: npz holds {names}; name the windows array 'X' or 'windows'")
        data = data[name]
    x = np.asarray(data)
    return check_windows(x, model, where=str(p)) if model is not None else x.astype(np.float32)


def check_windows(x: np.ndarray, model, *, where: str) -> np.ndarray:
    m = model.manifest
    if x.ndim != 3 or x.shape[1:] != (m.channels, m.window) or len(x) == 0:
        raise ModelError(f"{where}: windows have shape {list(x.shape)}, the model needs [N, {m.channels}, {m.window}]")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ModelError(f"{where}: windows contain NaN or inf")
    return x


def generator(model):
    """The manifest's ``module:function`` window generator, or None if it names none."""
    ref = model.manifest.calibration.get("generator")
    if not ref:
        return None
    mod_name, _, fn_name = str(ref).partition(":")
    try:
        return getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ModelError(f"{model.path}: calibration.generator {ref!r} cannot be loaded: {e}") from None


def representative_windows(model, n: int, seed: int, file: str | Path | None = None) -> np.ndarray | None:
    """``n`` windows (fewer if a file holds fewer) from the first source available, or None."""
    if file is not None:
        return load_windows_file(file, model)[:n]
    mfile = model.manifest.calibration.get("file")
    if mfile:
        return load_windows_file(model.path / mfile, model)[:n]
    gen = generator(model)
    if gen is None:
        return None
    try:
        x = np.asarray(gen(n, seed))
    except Exception as e:  # a generator is user code
        raise ModelError(f"{model.path}: calibration generator failed: {type(e).__name__}: {e}") from e
    return check_windows(x, model, where=f"{model.path} calibration.generator")


def calibration_windows(model, file: str | Path | None = None, n: int = CALIBRATION_N, seed: int = 0) -> np.ndarray:
    """Windows to calibrate int8 on; a ``ModelError`` saying how to provide them if there are none."""
    x = representative_windows(model, n, seed, file)
    if x is None:
        raise ModelError(f"{model.path}: int8 needs calibration windows: pass --calibration FILE (.npy/.npz "
                         "[N, C, L]) or set [calibration] generator or file in manifest.toml")
    return x
