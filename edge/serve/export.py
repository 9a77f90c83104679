"""Backbone export: one ``torch.export`` program with a dynamic batch, then ONNX from it.

Every compiled backend starts from the same exported program so that they all see
the same graph (BatchNorm folded by the exporter, no Python control flow). The ONNX
step prefers the dynamo exporter (needs ``onnxscript``) and falls back to the legacy
TorchScript exporter, logging why, because old installs on devices lack onnxscript.

A model folder that carries its exported graph (``model.onnx``, ``edge.zoo``) is served
from that graph instead, and then needs no torch: ``export_onnx`` copies it, and
``write_folder_graph`` (``scripts/export-onnx.py``) is what writes it, with the digest
of the ``model.py`` and weights it came from.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from edge.errors import BackendUnavailable, ModelError

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


def torch_available() -> bool:
    """Whether torch is installed here, found without importing it (an import costs seconds
    and hundreds of MB, which a daemon serving ONNX Runtime never needs)."""
    return importlib.util.find_spec("torch") is not None


def export_onnx(model, path: Path) -> str:
    """Write the backbone as ONNX (input ``x``, output ``features``); return where it came from:
    ``"model folder"`` (the folder's own ``model.onnx``), else the torch exporter used.

    ``BackendUnavailable`` if the folder carries no graph and torch is not installed."""
    path = Path(path)
    graph = model.graph()
    if graph is not None:
        path.write_bytes(graph)
        return "model folder"
    if not torch_available():
        raise no_graph_error(model)
    return _export_cached(model, path)


def no_graph_error(model) -> BackendUnavailable:
    """What to do where a folder without ``model.onnx`` meets a machine without torch."""
    return BackendUnavailable(f"{model.path} carries no exported graph (model.onnx) and torch is not installed "
                              f"here: install torch, or export the graph where torch is "
                              f"(python scripts/export-onnx.py {model.path}) and ship the folder with it")


def _export_cached(model, path: Path) -> str:
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


def write_folder_graph(model) -> Path:
    """Export ``model``'s backbone with torch into its folder as ``model.onnx``, recording the
    folder's ``source_digest`` in the graph's metadata; return the path.

    Always a fresh export (a graph already there is replaced), written to a temporary
    file and renamed, so a folder never holds half a graph.
    """
    import onnx

    from edge.zoo import GRAPH_FILE, GRAPH_SOURCE_KEY

    final = model.path / GRAPH_FILE
    tmp = final.with_suffix(f".{os.getpid()}.tmp")
    try:
        exporter = _export_onnx(model, tmp)
        g = onnx.load_model(str(tmp), load_external_data=False)
        # The exporter's per-node debug records name the module ``model.py`` ran as, which
        # carries the content hash, which covers this graph: drop them, so that the same
        # sources give the same bytes.
        for node in g.graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
        del g.metadata_props[:]
        for key, value in ((GRAPH_SOURCE_KEY, model.source_digest), ("edge.exporter", exporter),
                           ("edge.model", f"{model.manifest.name} {model.manifest.version}")):
            g.metadata_props.add(key=key, value=value)
        tmp.write_bytes(g.SerializeToString())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def run_graph(graph: bytes, x: np.ndarray) -> np.ndarray:
    """Features of windows ``x`` from an exported graph, by ONNX Runtime on the CPU (no torch):
    what ``edge run --check`` runs one window through where torch is not installed."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)})[0]


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
