"""The ONNX Runtime serving path on aarch64, in two stages (run by scripts/check-arm64.sh).

    python scripts/arm64_ort_check.py host OUT     (x86-64, with torch: a tiny model folder, its
                                                    exported ONNX graph, golden windows and the
                                                    torch fp32 reference, calibration windows)
    python scripts/arm64_ort_check.py device OUT   (aarch64, without torch: the formats this CPU
                                                    picks, each built with the project's own
                                                    ONNX Runtime build (quantization on aarch64),
                                                    loaded and parity-gated against the reference)

The device stage writes OUT/arm64-check.json and exits 1 if a format int8_formats picks
fails its gate or torch was imported.
"""
from __future__ import annotations

import json
import platform
import shutil
import sys
from pathlib import Path

import numpy as np


def host(out: Path) -> None:
    from edge.serve import parity
    from edge.serve.backends.torch_eager import TorchBackend
    from edge.serve.calibration import calibration_windows
    from edge.serve.export import export_onnx
    from edge.serve.testing import make_tiny_model

    model = make_tiny_model(out / "model")
    export_onnx(model, out / "exported.onnx")
    golden = parity.Golden.make(model).with_reference(TorchBackend.load(model, precision="fp32", threads=None))
    golden.save(out / "golden.npz")
    np.save(out / "calibration.npy", calibration_windows(model))
    print(f"host stage: {model.path}, exported.onnx, golden.npz, calibration.npy in {out}")


def device(out: Path) -> int:
    import onnxruntime as ort

    import edge.serve.export as export
    from edge.serve import parity
    from edge.serve.backends.ort import OnnxRuntimeBackend
    from edge.serve.cpu import cpu_features, int8_formats
    from edge.zoo import resolve_model

    # the graph exported on the host stands in for torch.export, which needs torch
    export.export_onnx = lambda model, path: shutil.copy(out / "exported.onnx", path) and "host-exported"
    model = resolve_model(str(out / "model"))
    golden = parity.Golden.load(out / "golden.npz")
    calib = np.load(out / "calibration.npy")
    head = parity.head_scores(model)
    cpu = cpu_features()
    picked = [f.name for f in int8_formats(cpu)]
    rows, ok = [], True
    for precision, variant in [("fp32", "")] + [("int8", v) for v in picked]:
        d = out / f"artifact-{precision}-{variant or 'fp32'}"
        d.mkdir(exist_ok=True)
        OnnxRuntimeBackend.build(model, precision=precision, example=None, calibration=calib, out_dir=d, variant=variant)
        b = OnnxRuntimeBackend.load(model, precision=precision, artifact_dir=d)
        report = parity.check(model, b, golden, head=head)
        rows.append({"precision": precision, "variant": variant, "provider": b.provider, "passed": report.passed,
                     "summary": report.summary()})
        ok &= report.passed
        print(f"{precision} {variant}: {'pass' if report.passed else 'FAIL'}: {report.summary()}")
    result = {"machine": platform.machine(), "cpu": cpu.summary(), "formats": picked, "onnxruntime": ort.__version__,
              "torch_imported": "torch" in sys.modules, "results": rows}
    (out / "arm64-check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "results"}))
    return 0 if ok and not result["torch_imported"] and result["machine"] == "aarch64" else 1


if __name__ == "__main__":
    stage, where = sys.argv[1], Path(sys.argv[2])
    where.mkdir(parents=True, exist_ok=True)
    sys.exit(host(where) or 0 if stage == "host" else device(where))
