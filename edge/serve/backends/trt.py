"""``tensorrt``: the backbone compiled by torch-tensorrt's dynamo path, fp16, int8 or fp32.

TensorRT engines are tied to the GPU, the TensorRT and torch-tensorrt versions and, on
a Jetson, the JetPack (L4T) release, so they are built on the device at first start and
cached under that fingerprint (``platform``). The API moved between the release JetPack
ships (torch-tensorrt 2.2-2.5: ``inputs=``, ``save`` without ``dynamic_shapes``) and
current ones (``arg_inputs=``, ``save(..., dynamic_shapes=)``); ``_call`` passes only
the keywords a given release accepts.

Batch: the program is exported with a dynamic batch dimension and compiled for the
profile ``Input(min=1, opt=OPT_BATCH, max=MAX_BATCH)``. Saving must keep that dimension
dynamic, or the saved program serves batch 1 only: with ``dynamic_shapes`` where
``save`` takes it (re-traced), else without re-tracing (the graph keeps the symbolic
batch of the export). ``build`` reloads what it saved and runs batch 1, ``OPT_BATCH``
and ``MAX_BATCH`` through it; a program that cannot is refused there, with that reason,
instead of being cached and failing the gate at every start.

int8 goes through NVIDIA ModelOpt as torch-tensorrt's PTQ example does: ``mtq.quantize``
calibrates fake-quantization (QDQ) nodes on the calibration windows, and export and
compile run inside ModelOpt's ``export_torch_mode()`` so the QDQ nodes are exported as
TensorRT quantize/dequantize ops. Without ModelOpt int8 is unavailable (it is in the
``tensorrt`` extra) and the choice measures fp16 and fp32 only.

Importing this module imports neither torch nor torch-tensorrt: ``availability`` first
checks, cheaply, that torch-tensorrt is installed and that an NVIDIA device node exists,
so a CPU-only daemon stays lean.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import BackendUnavailable
from edge.serve.backends.base import Backend
from edge.serve.progress import step

log = logging.getLogger("edge.serve")

ENGINE_FILE = "backbone.ep"
OPT_BATCH, MAX_BATCH = 8, 64
#: device nodes of a discrete NVIDIA GPU and of a Jetson's integrated one
GPU_NODES = ("/dev/nvidia0", "/dev/nvhost-ctrl-gpu", "/dev/nvgpu/igpu0/ctrl")

_TRT = None  # the torch_tensorrt module, once imported
_IMPORT_ERROR: Exception | None = None


def _torch_tensorrt():
    """torch_tensorrt, imported on first use (it imports torch and libnvinfer)."""
    global _TRT, _IMPORT_ERROR
    if _TRT is None and _IMPORT_ERROR is None:
        try:  # torch-tensorrt fails with OSError/RuntimeError too when libnvinfer is missing
            import torch_tensorrt
            _TRT = torch_tensorrt
        except Exception as e:  # noqa: BLE001  soft import, logged and reported by the registry
            _IMPORT_ERROR = e
            log.info("tensorrt backend unavailable: %s: %s", type(e).__name__, e)
    return _TRT


def _call(fn, *args, **kwargs):
    """Call ``fn`` with the keywords its signature accepts (releases renamed ``inputs``)."""
    params = inspect.signature(fn).parameters
    if "arg_inputs" in kwargs and "arg_inputs" not in params:
        kwargs["inputs"] = kwargs.pop("arg_inputs")
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(*args, **kwargs)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params})


def _accepts(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params


def parse_l4t(text: str) -> str | None:
    """The L4T release from ``/etc/nv_tegra_release`` (JetPack 6.0 is L4T R36.3).

    >>> parse_l4t("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64")
    'R36.3.0'
    >>> parse_l4t("") is None
    True
    """
    m = re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", text)
    return f"R{m.group(1)}.{m.group(2)}" if m else None


def jetpack_release() -> dict[str, str | None]:
    """{"l4t": ..., "jetpack": ...} on a Jetson; both None elsewhere."""
    try:
        l4t = parse_l4t(Path("/etc/nv_tegra_release").read_text())
    except OSError:
        return {"l4t": None, "jetpack": None}
    jp = None
    try:  # the meta-package's version is the JetPack release, e.g. "6.0+b106"
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"], capture_output=True,
                           text=True, timeout=10)
        jp = r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError) as e:
        log.info("cannot ask dpkg for the JetPack release: %s", e)
    return {"l4t": l4t, "jetpack": jp}


class TensorRTBackend(Backend):
    key = "tensorrt"
    precisions = ("int8", "fp16", "fp32")
    install_hint = "pip install 'edge-runtime[tensorrt]' (on Jetson: the torch-tensorrt wheel for your JetPack)"

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if _TRT is None:
            if importlib.util.find_spec("torch_tensorrt") is None:
                return False, "torch-tensorrt is not installed"
            if not any(Path(p).exists() for p in GPU_NODES):
                return False, f"no CUDA device (none of {', '.join(GPU_NODES)} exists)"
        trt = _torch_tensorrt()
        if trt is None:
            return False, f"torch-tensorrt is not importable ({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR})"
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA device (torch.cuda.is_available() is False)"
        if not hasattr(trt, "save") and not hasattr(getattr(trt, "dynamo", None), "export"):
            return False, f"torch-tensorrt {trt.__version__} cannot save compiled programs (need >= 2.2)"
        return True, f"torch-tensorrt {trt.__version__} on {torch.cuda.get_device_name(0)}"

    @classmethod
    def int8_available(cls) -> tuple[bool, str]:
        if importlib.util.find_spec("modelopt") is None:
            return False, "TensorRT int8 needs NVIDIA ModelOpt: pip install nvidia-modelopt (in the tensorrt extra)"
        return True, "nvidia-modelopt installed"

    @classmethod
    def variants(cls, precision: str) -> list[str]:
        return [""]

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
                "tensorrt": trt_version, "torch_tensorrt": _torch_tensorrt().__version__,
                "torch": torch.__version__, "cuda": torch.version.cuda, **jetpack_release()}

    @classmethod
    def build(cls, model, *, precision, example, calibration, out_dir: Path, progress=None) -> list[str]:
        import torch

        trt = _torch_tensorrt()
        m = model.manifest
        spec = trt.Input(min_shape=(1, m.channels, m.window), opt_shape=(OPT_BATCH, m.channels, m.window),
                         max_shape=(MAX_BATCH, m.channels, m.window), dtype=torch.float32)
        x = torch.from_numpy(np.ascontiguousarray(example[:2])).cuda()
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        dynamic = ({0: batch},)
        where = torch.cuda.get_device_name(0)
        if precision == "int8":
            gm = cls._compile_int8(model, calibration, spec, x, dynamic, progress, where)
        else:
            from edge.serve.export import export_program

            with step(progress, "export backbone (torch.export, dynamic batch)"):
                ep = export_program(model, device="cuda", max_batch=MAX_BATCH)
            enabled = {"fp16": {torch.float16, torch.float32}, "fp32": {torch.float32}}[precision]
            with step(progress, f"compile TensorRT {precision} engine on {where} (batch 1..{MAX_BATCH})"):
                gm = _call(trt.dynamo.compile, ep, arg_inputs=[spec], enabled_precisions=enabled, min_block_size=1)
        path = Path(out_dir) / ENGINE_FILE
        with step(progress, "save compiled program (dynamic batch)"):
            cls._save(gm, path, x, dynamic)
        with step(progress, f"check the saved program at batch 1, {OPT_BATCH} and {MAX_BATCH}"):
            module = cls._load_module(path)
            for b in (1, OPT_BATCH, MAX_BATCH):
                xb = torch.randn(b, m.channels, m.window, device="cuda")
                try:
                    with torch.inference_mode():
                        out = module(xb)
                except Exception as e:  # noqa: BLE001  any failure here means "not servable"
                    raise BackendUnavailable(f"the saved TensorRT program does not run at batch {b} "
                                             f"({type(e).__name__}: {e}); saved without a dynamic batch?") from e
                if tuple(out.shape) != (b, m.feature_size):
                    raise BackendUnavailable(f"the saved TensorRT program returns {list(out.shape)} at batch {b}")
        return [ENGINE_FILE]

    @classmethod
    def _compile_int8(cls, model, calibration, spec, x, dynamic, progress, where):
        """ModelOpt PTQ, then export and compile inside ``export_torch_mode()`` (upstream's recipe)."""
        import torch

        ok, why = cls.int8_available()
        if not ok:
            raise BackendUnavailable(why)
        if calibration is None:
            raise BackendUnavailable("TensorRT int8 needs calibration windows")
        import modelopt.torch.quantization as mtq
        from modelopt.torch.quantization.utils import export_torch_mode

        trt = _torch_tensorrt()
        backbone, _ = model.build()
        backbone = backbone.cuda().eval()
        cal = torch.from_numpy(np.ascontiguousarray(calibration))

        def forward_loop(mod):
            with torch.no_grad():
                for i in range(0, len(cal), 32):
                    mod(cal[i:i + 32].cuda())

        with step(progress, f"calibrate int8 with ModelOpt ({len(cal)} windows)"):
            mtq.quantize(backbone, mtq.INT8_DEFAULT_CFG, forward_loop=forward_loop)
        with step(progress, f"export and compile TensorRT int8 engine on {where} (batch 1..{MAX_BATCH})"):
            with torch.no_grad(), export_torch_mode():
                ep = torch.export.export(backbone, (x,), dynamic_shapes=dynamic, strict=False)
                return _call(trt.dynamo.compile, ep, arg_inputs=[spec],
                             enabled_precisions={torch.int8, torch.float16, torch.float32}, min_block_size=1)

    @classmethod
    def _save(cls, gm, path: Path, x, dynamic) -> None:
        import torch

        trt = _torch_tensorrt()
        save = getattr(trt, "save", None)
        if save is None:  # torch-tensorrt 2.1 / 2.2 (JetPack 6.0): export the graph module itself
            torch.export.save(trt.dynamo.export(gm, [x]), str(path))
        elif _accepts(save, "dynamic_shapes"):
            _call(save, gm, str(path), output_format="exported_program", arg_inputs=[x], dynamic_shapes=dynamic,
                  retrace=True)
        else:
            # Re-tracing here would trace at the example's batch only; without it, the
            # exporter keeps the graph's symbolic batch from the dynamic export.
            _call(save, gm, str(path), output_format="exported_program", arg_inputs=[x], retrace=False)

    @staticmethod
    def _load_module(path: Path):
        import torch

        trt = _torch_tensorrt()
        loader = getattr(trt, "load", None) or torch.export.load
        obj = loader(str(path))
        return obj.module() if isinstance(obj, torch.export.ExportedProgram) else obj

    @classmethod
    def load(cls, model, *, precision, artifact_dir, artifact_hash=None, threads=1) -> "TensorRTBackend":
        path = Path(artifact_dir) / ENGINE_FILE
        m = model.manifest
        b = cls(precision=precision, channels=m.channels, window=m.window, feature_size=m.feature_size,
                artifact=path, artifact_hash=artifact_hash, threads=threads)
        b._module = cls._load_module(path)
        return b

    @property
    def provider(self) -> str:
        import torch

        return f"TensorRT on {torch.cuda.get_device_name(0)}"

    def _run(self, x: np.ndarray) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            # The engine's profile ends at MAX_BATCH; larger batches go in slices.
            for i in range(0, len(x), MAX_BATCH):
                out.append(self._module(torch.from_numpy(x[i:i + MAX_BATCH]).cuda()).float().cpu().numpy())
        return np.concatenate(out)
