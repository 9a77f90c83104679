"""Small value types shared by sources, the windower and the pipeline."""
from __future__ import annotations

from typing import NamedTuple


class StreamKey(NamedTuple):
    """One sensor stream: the device it comes from and the stream's name on that device."""

    device: str
    stream: str

    def __str__(self) -> str:
        return f"{self.device}/{self.stream}"
