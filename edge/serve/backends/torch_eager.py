"""``torch``: the eager fp32 backbone, the reference every compiled artifact is judged by.

It needs no artifact (it loads straight from the model folder), so it is also the
backend of last resort when every compiled one is unavailable or refused.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge.serve.backends.base import Backend


class TorchBackend(Backend):
    key = "torch"
    precisions = ("fp32",)
    install_hint = "pip install torch"
    needs_artifact = False

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        from edge.serve.export import torch_available

        # found, not imported: a serving-only install (a container) has no torch at all
        return (True, "torch is installed") if torch_available() else (False, "torch is not installed")

    @classmethod
    def platform(cls) -> dict[str, Any]:
        import torch

        return {"torch": torch.__version__}

    @classmethod
    def build(cls, model, *, precision, example, calibration, out_dir: Path, progress=None) -> list[str]:
        return []

    @classmethod
    def load(cls, model, *, precision, artifact_dir=None, artifact_hash=None, threads=1) -> "TorchBackend":
        import torch

        # torch's thread count is process-wide; when serving, the daemon pins it so the
        # reference backbone, like the compiled ones, cannot take every core from the
        # other threads. ``threads=None`` (the parity reference) leaves it alone.
        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        backbone, _ = model.build()
        m = model.manifest
        b = cls(precision="fp32", channels=m.channels, window=m.window, feature_size=m.feature_size,
                threads=threads)
        b._module = backbone
        return b

    def _run(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self._module(torch.from_numpy(x)).numpy()
