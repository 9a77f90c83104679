"""``tensorrt``: the backbone compiled by torch-tensorrt's dynamo path, fp16 or int8.

TensorRT engines are tied to the GPU, TensorRT and torch-tensorrt versions, so they are
built on the device at first start and cached under that fingerprint. The API moved
between the release JetPack ships (torch-tensorrt 2.2-2.5: ``inputs=``, ``save`` without
``arg_inputs``, no ``load``) and current ones (``arg_inputs=``, ``torch_tensorrt.load``);
``_call`` passes only the keywords a given release accepts. int8 goes through NVIDIA
ModelOpt (calibrated QDQ nodes that TensorRT turns into int8 layers), as current
torch-tensorrt documents; without it int8 is unavailable and fp16 is the choice.
"""
from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import BackendUnavailable
from edge.serve.backends.base import Backend
from edge.serve.progress import step

log = logging.getLogger("edge.serve")

try:  # torch-tensorrt fails with OSError/RuntimeError too when libnvinfer is missing
    import torch_tensorrt
    _IMPORT_ERROR = None
except Exception as e:  # noqa: BLE001  soft import, logged and reported by the registry
    torch_tensorrt = None
    _IMPORT_ERROR = e
    log.info("tensorrt backend unavailable: %s: %s", type(e).__name__, e)

ENGINE_FILE = "backbone.ep"
OPT_BATCH, MAX_BATCH = 8, 64


def _call(fn, *args, **kwargs):
    """Call ``fn`` with the keywords its signature accepts (releases renamed ``inputs``)."""
    params = inspect.signature(fn).parameters
    if "arg_inputs" in kwargs and "arg_inputs" not in params:
        kwargs["inputs"] = kwargs.pop("arg_inputs")
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(*args, **kwargs)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params})


class TensorRTBackend(Backend):
    key = "tensorrt"
    precisions = ("fp16", "int8", "fp32")
    install_hint = "pip install 'edge-runtime[tensorrt]' (on Jetson: the torch-tensorrt wheel for your JetPack)"

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if torch_tensorrt is None:
            return False, f"torch-tensorrt is not importable ({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR})"
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA device"
        if not hasattr(torch_tensorrt, "save") and not hasattr(getattr(torch_tensorrt, "dynamo", None), "export"):
            return False, f"torch-tensorrt {torch_tensorrt.__version__} cannot save compiled programs (need >= 2.2)"
        return True, f"torch-tensorrt {torch_tensorrt.__version__} on {torch.cuda.get_device_name(0)}"

    @classmethod
    def platform(cls) -> dict[str, Any]:
        import torch

        try:
            import tensorrt
            trt_version = tensorrt.__version__
        except Exception as e:  # noqa: BLE001  the version is informative, not required
            log.info("tensorrt module not importable for its version: %s", e)
            trt_version = "unknown"
        cc = torch.cuda.get_device_capability(0)
        return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{cc[0]}.{cc[1]}",
                "tensorrt": trt_version, "torch_tensorrt": torch_tensorrt.__version__,
                "torch": torch.__version__, "cuda": torch.version.cuda}

    @classmethod
    def build(cls, model, *, precision, example, calibration, out_dir: Path, progress=None) -> list[str]:
        import torch

        from edge.serve.export import export_program

        m = model.manifest
        spec = torch_tensorrt.Input(min_shape=(1, m.channels, m.window), opt_shape=(OPT_BATCH, m.channels, m.window),
                                    max_shape=(MAX_BATCH, m.channels, m.window), dtype=torch.float32)
        x = torch.from_numpy(example[:1]).cuda()
        with step(progress, "export backbone (torch.export)"):
            if precision == "int8":
                ep = cls._int8_program(model, calibration)
            else:
                ep = export_program(model, device="cuda", max_batch=MAX_BATCH)
        precisions = {"fp16": {torch.float16, torch.float32}, "int8": {torch.int8, torch.float16, torch.float32},
                      "fp32": {torch.float32}}[precision]
        with step(progress, f"compile TensorRT {precision} engine on {torch.cuda.get_device_name(0)}"):
            gm = _call(torch_tensorrt.dynamo.compile, ep, arg_inputs=[spec], enabled_precisions=precisions,
                       min_block_size=1)
        path = Path(out_dir) / ENGINE_FILE
        with step(progress, "save compiled program"):
            if hasattr(torch_tensorrt, "save"):
                _call(torch_tensorrt.save, gm, str(path), output_format="exported_program", arg_inputs=[x],
                      retrace=True)
            else:  # torch-tensorrt 2.1 / 2.2 (JetPack 6.0)
                torch.export.save(torch_tensorrt.dynamo.export(gm, [x]), str(path))
        return [ENGINE_FILE]

    @classmethod
    def _int8_program(cls, model, calibration):
        import torch

        try:
            import modelopt.torch.quantization as mtq
            from modelopt.torch.quantization.utils import export_torch_mode
        except ImportError as e:
            raise BackendUnavailable(f"TensorRT int8 needs NVIDIA ModelOpt ({e}): pip install nvidia-modelopt, "
                                     "or use --precision fp16") from e
        backbone, _ = model.build()
        backbone = backbone.cuda()
        cal = torch.from_numpy(calibration)

        def forward_loop(mod):
            for i in range(0, len(cal), 32):
                mod(cal[i:i + 32].cuda())

        mtq.quantize(backbone, mtq.INT8_DEFAULT_CFG, forward_loop=forward_loop)
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        with torch.no_grad(), export_torch_mode():
            return torch.export.export(backbone, (cal[:2].cuda(),), dynamic_shapes=({0: batch},))

    @classmethod
    def load(cls, model, *, precision, artifact_dir, artifact_hash=None, threads=1) -> "TensorRTBackend":
        import torch

        path = Path(artifact_dir) / ENGINE_FILE
        loader = getattr(torch_tensorrt, "load", None) or torch.export.load
        obj = loader(str(path))
        module = obj.module() if isinstance(obj, torch.export.ExportedProgram) else obj
        m = model.manifest
        b = cls(precision=precision, channels=m.channels, window=m.window, feature_size=m.feature_size,
                artifact=path, artifact_hash=artifact_hash, threads=threads)
        b._module = module
        return b

    @property
    def provider(self) -> str:
        import torch

        return f"TensorRT on {torch.cuda.get_device_name(0)}"

    def _run(self, x: np.ndarray) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            # The engine was built for batches up to MAX_BATCH; larger ones go in slices.
            for i in range(0, len(x), MAX_BATCH):
                out.append(self._module(torch.from_numpy(x[i:i + MAX_BATCH]).cuda()).float().cpu().numpy())
        return np.concatenate(out)

