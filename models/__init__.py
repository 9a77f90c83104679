"""The model zoo: one folder per model (manifest.toml, model.py, weights, train.py, CARD.md).

Installed as the package ``edge_models`` so that shipped models are found after a
plain install; ``edge.zoo`` resolves model names and folders.
"""
