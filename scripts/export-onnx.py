#!/usr/bin/env python3
"""Export model folders' backbones to ``model.onnx``, so that serving them needs no torch.

    python scripts/export-onnx.py                 every shipped model (models/*)
    python scripts/export-onnx.py FOLDER [...]    these model folders

Needs torch (and onnxscript for the dynamo exporter). Each graph records the digest of
the ``model.py`` and ``weights.safetensors`` it was exported from (``edge.zoo``), so a
graph left behind by retraining is refused instead of served: run this after every
``train.py``. The graph is part of the folder's content that ``edge pin`` covers; the
model's identity (``ModelFolder.content_hash``: checkpoints, compiled artifacts) stays that of
its ``model.py`` and weights, which the graph must match.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from edge.serve.export import write_folder_graph  # noqa: E402
from edge.zoo import ModelFolder, shipped_models  # noqa: E402


def main(argv: list[str]) -> int:
    folders = [ModelFolder(a) for a in argv] or [ModelFolder(p) for p in shipped_models().values()]
    for folder in folders:
        path = write_folder_graph(folder)
        again = ModelFolder(folder.path)
        again.graph()  # the graph just written is bound to this folder's sources (ModelError if not)
        print(f"{path}: {path.stat().st_size} bytes, source {again.source_digest[:16]}...")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
