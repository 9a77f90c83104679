"""Rewrite the README's configuration reference from the config dataclasses (edge.config.reference_table).

The reference runs from the first section's heading ("#### `[node]`") to the end of the
last section's table; tests/test_config.py fails when README.md and the dataclasses disagree.
"""
from pathlib import Path

from edge.config import reference_table

readme = Path(__file__).resolve().parent.parent / "README.md"
text = readme.read_text()
ref = reference_table().rstrip("\n") + "\n"
last = [line for line in ref.splitlines() if line.startswith("#### ")][-1]
start = text.index("#### `[node]`")
heading = text.index(last, start) if last in text[start:] else text.rindex("#### ", start)
end = text.index("\n\n", text.index("\n|", heading)) + 1  # the end of that table
readme.write_text(text[:start] + ref + text[end:])
print("README.md configuration reference updated")
