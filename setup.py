"""Package discovery that pyproject.toml alone cannot express.

The model zoo lives in the top-level ``models/`` folder (see DESIGN.md) but must be
found after a plain, non-editable install too, so it is installed as the package
``edge_models`` with every file of every model folder as package data.

Data folders (each model folder, the C reference and its Arduino sketch) are listed as
namespace packages: setuptools warns about, and will one day drop, a folder that Python
could import but ``packages`` does not name.
"""
from setuptools import find_namespace_packages, find_packages, setup

DATA = ["*.toml", "*.md", "*.safetensors", "*.onnx", "*.json", "*.npz", "*.c", "*.h", "*.ino"]

setup(
    packages=find_packages(include=["edge", "edge.*", "firmware_bridge", "firmware_bridge.*"])
    + find_namespace_packages(include=["firmware_bridge.c", "firmware_bridge.c.*"])
    + ["edge_models"] + ["edge_models." + p for p in find_namespace_packages(where="models", exclude=["*__pycache__*"])],
    package_dir={"edge_models": "models"},
    package_data={"": DATA},
)
