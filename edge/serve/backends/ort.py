"""``onnxruntime``: the backbone as ONNX, fp32 or static int8 (QDQ, per-channel weights).

int8 is built in each quantization format that suits this CPU (``edge.serve.cpu``:
u8s8 with VNNI, u8s8 with ``reduce_range`` or u8u8 on AVX2 without it, s8s8 on ARM),
one cache entry per format (the variant); which one serves is measured. Sessions run sequentially on a configured number of
intra-op threads (default 1) without spinning, so inference cannot starve the daemon's
other threads. CUDA / TensorRT execution providers are used first when present.
"""
from __future__ import annotations

import logging
import platform as _platform
from pathlib import Path
from typing import Any

import numpy as np

from edge.serve.backends.base import Backend
from edge.serve.cpu import FORMATS, cpu_features, int8_formats
from edge.serve.progress import step as _step

log = logging.getLogger("edge.serve")

try:
    import onnxruntime as ort
    _IMPORT_ERROR = None
except ImportError as e:  # soft: the registry reports it and names the package
    ort = None
    _IMPORT_ERROR = e
    log.info("onnxruntime backend unavailable: %s", e)

MODEL_FILE = "model.onnx"
_PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def cpu_has_vnni() -> bool:
    """x86 VNNI makes u8*s8 dot products exact; without it ORT advises 7-bit weights."""
    return cpu_features().vnni


def quant_settings(fmt: str | None = None) -> dict[str, Any]:
    """``quantize_static`` keywords for the format ``fmt`` (default: the first that suits this CPU)."""
    from onnxruntime.quantization import QuantType

    f = FORMATS[fmt] if fmt else int8_formats(cpu_features())[0]
    qtype = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
    return {"activation_type": qtype[f.activation], "weight_type": qtype[f.weight], "reduce_range": f.reduce_range}


class _Windows:
    """CalibrationDataReader over an array of windows, in batches, reporting progress."""

    def __init__(self, windows: np.ndarray, batch: int = 32, progress=None):
        self.windows, self.batch, self.i, self.progress = windows, batch, 0, progress

    def get_next(self):
        if self.i >= len(self.windows):
            return None
        x = self.windows[self.i:self.i + self.batch]
        self.i += len(x)
        if self.progress is not None:
            self.progress.advance(len(x))
        return {"x": np.ascontiguousarray(x, dtype=np.float32)}


class OnnxRuntimeBackend(Backend):
    key = "onnxruntime"
    precisions = ("int8", "fp32")
    install_hint = "pip install onnxruntime"

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if ort is None:
            return False, f"onnxruntime is not importable ({_IMPORT_ERROR})"
        return True, f"onnxruntime {ort.__version__} ({', '.join(cls.providers())})"

    @classmethod
    def providers(cls) -> list[str]:
        have = set(ort.get_available_providers())
        return [p for p in _PREFERRED_PROVIDERS if p in have]

    @classmethod
    def platform(cls) -> dict[str, Any]:
        # int8 kernels (and so the numbers) differ by ISA; providers change the engine.
        return {"onnxruntime": ort.__version__, "machine": _platform.machine(),
                "vnni": cpu_has_vnni(), "providers": cls.providers()}

    @classmethod
    def variants(cls, precision: str) -> list[str]:
        return [f.name for f in int8_formats(cpu_features())] if precision == "int8" else [""]

    @classmethod
    def build(cls, model, *, precision, example, calibration, out_dir: Path, progress=None,
              variant: str = "") -> list[str]:
        from edge.serve.export import export_onnx

        out_dir = Path(out_dir)
        raw = out_dir / "exported.onnx"
        with _step(progress, "export backbone to ONNX"):
            exporter = export_onnx(model, raw)
        log.info("exported %s with the %s ONNX exporter", model.manifest.name, exporter)
        if precision == "fp32":
            raw.rename(out_dir / MODEL_FILE)
            return [MODEL_FILE]
        if calibration is None:
            raise ValueError("int8 quantization needs calibration windows")
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = out_dir / "preprocessed.onnx"
        with _step(progress, "optimize graph for quantization"):
            quant_pre_process(str(raw), str(pre))
        fmt = variant or int8_formats(cpu_features())[0].name
        with _step(progress, f"calibrate and quantize int8 (QDQ {fmt}, per-channel)", total=len(calibration)):
            quantize_static(str(pre), str(out_dir / MODEL_FILE), _Windows(calibration, progress=progress),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            calibrate_method=CalibrationMethod.MinMax, **quant_settings(fmt))
        raw.unlink()
        pre.unlink()
        for extra in out_dir.glob("*.onnx.data"):
            extra.unlink()
        return [MODEL_FILE]

    @classmethod
    def load(cls, model, *, precision, artifact_dir, artifact_hash=None, threads=1) -> "OnnxRuntimeBackend":
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, int(threads))
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning worker threads burn a core waiting for work that the daemon's other
        # threads need; sensor windows arrive far slower than a spin-wait pays off.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        path = Path(artifact_dir) / MODEL_FILE
        sess = ort.InferenceSession(str(path), so, providers=cls.providers())
        m = model.manifest
        b = cls(precision=precision, channels=m.channels, window=m.window, feature_size=m.feature_size,
                artifact=path, artifact_hash=artifact_hash, threads=threads)
        b._session = sess
        b._input = sess.get_inputs()[0].name
        return b

    @property
    def provider(self) -> str:
        return self._session.get_providers()[0]

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: x})[0]

