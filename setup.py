"""Package discovery that pyproject.toml alone cannot express.

The model zoo lives in the top-level ``models/`` folder (see DESIGN.md) but must be
found after a plain, non-editable install too, so it is installed as the package
``edge_models`` with every file of every model folder as package data.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["edge", "edge.*", "firmware_bridge", "firmware_bridge.*"])
    + ["edge_models"],
    package_dir={"edge_models": "models"},
    package_data={
        "edge_models": ["*/*.toml", "*/*.py", "*/*.md", "*/*.safetensors", "*/*.json", "*/*.npz"],
        "firmware_bridge": ["*.md", "c/*.c", "c/*.h", "c/*/*.ino", "c/*/*"],
        "edge": ["data/*", "fleet/*.md"],
    },
)
