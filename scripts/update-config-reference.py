"""Rewrite the README's configuration reference from the config dataclasses (edge.config.reference_table).

The reference lies between the first "#### `[node]`" heading and the line after the last table;
tests/test_config.py fails when README.md and the dataclasses disagree.
"""
from pathlib import Path

from edge.config import reference_table

readme = Path(__file__).resolve().parent.parent / "README.md"
text = readme.read_text()
start = text.index("#### `[node]`")
end = text.index("#### `[[sources]]`", start)
end = text.index("\n\n", text.index("\n|", end)) + 1  # the end of the sources table
readme.write_text(text[:start] + reference_table().rstrip("\n") + "\n" + text[end:])
print("README.md configuration reference updated")
