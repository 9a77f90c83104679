"""Backbone export: one ``torch.export`` program with a dynamic batch, then ONNX from it.

Every compiled backend starts from the same exported program so that they all see
the same graph (BatchNorm folded by the exporter, no Python control flow). The ONNX
step prefers the dynamo exporter (needs ``onnxscript``) and falls back to the legacy
TorchScript exporter, logging why, because old installs on devices lack onnxscript.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np

from edge.errors import ModelError

log = logging.getLogger("edge.serve")
# torch's exporter warns about every torchvision op it cannot register; we use none of them
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

MAX_BATCH = 4096
OPSET = 17


def example_input(model, batch: int = 2) -> np.ndarray:
    """A deterministic example window batch of the model's input shape."""
    m = model.manifest
    return np.random.default_rng(0).standard_normal((batch, m.channels, m.window)).astype(np.float32)


def export_program(model, *, device: str = "cpu", max_batch: int = MAX_BATCH):
    """``torch.export`` the backbone, on ``device``, with a dynamic batch dimension."""
    import torch

    backbone, _ = model.build()
    backbone = backbone.to(device)
    x = torch.from_numpy(example_input(model)).to(device)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    try:
        with torch.no_grad():
            return torch.export.export(backbone, (x,), dynamic_shapes=({0: batch},))
    except Exception as e:  # torch.export raises many kinds; all mean "not exportable"
        raise ModelError(f"{model.path}: torch.export of the backbone failed: {type(e).__name__}: {e}") from e


# content hash -> (ONNX bytes, exporter): a rebuild in the same process (int8 refused,
# then fp32; a corrupt artifact rebuilt) reuses the export, the slowest step on a CPU.
_EXPORTED: dict[str, tuple[bytes, str]] = {}


def export_onnx(model, path: Path) -> str:
    """Write the backbone as ONNX (input ``x``, output ``features``); return the exporter used."""
    path = Path(path)
    if model.content_hash not in _EXPORTED:
        exporter = _export_onnx(model, path)
        if len(_EXPORTED) >= 4:
            _EXPORTED.pop(next(iter(_EXPORTED)))
        _EXPORTED[model.content_hash] = (path.read_bytes(), exporter)
        return exporter
    data, exporter = _EXPORTED[model.content_hash]
    path.write_bytes(data)
    return exporter


def _export_onnx(model, path: Path) -> str:
    import torch

    x = torch.from_numpy(example_input(model))
    errors = []
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as e:
        log.info("onnxscript is not installed (%s); using the legacy ONNX exporter", e)
        errors.append(f"dynamo: {e}")
    else:
        ep = export_program(model)
        try:
            with _quiet():
                torch.onnx.export(ep, (x,), str(path), dynamo=True, input_names=["x"],
                                  output_names=["features"], external_data=False, verbose=False,
                                  opset_version=max(OPSET, 18))
            return "dynamo"
        except Exception as e:  # exporter bugs surface as many types
            log.warning("dynamo ONNX export failed (%s: %s); trying the legacy exporter", type(e).__name__, e)
            errors.append(f"dynamo: {type(e).__name__}: {e}")
    backbone, _ = model.build()
    try:
        with torch.no_grad(), _quiet():
            torch.onnx.export(backbone, (x,), str(path), dynamo=False, input_names=["x"],
                              output_names=["features"], opset_version=OPSET,
                              dynamic_axes={"x": {0: "batch"}, "features": {0: "batch"}})
        return "legacy"
    except Exception as e:
        errors.append(f"legacy: {type(e).__name__}: {e}")
        raise ModelError(f"{model.path}: ONNX export of the backbone failed ({'; '.join(errors)})") from e


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter prints progress lines to stdout; keep the daemon's stdout clean."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), warnings.catch_warnings():
        # torch's own exporter internals warn about their deprecated pytree APIs.
        warnings.simplefilter("ignore", FutureWarning)
        yield
    for line in buf.getvalue().splitlines():
        log.debug("onnx export: %s", line)
