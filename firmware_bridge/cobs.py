"""Consistent Overhead Byte Stuffing (Cheshire & Baker, 1999).

The encoded form holds no 0x00 byte, so 0x00 can delimit frames on the wire and a
receiver resynchronises at the next 0x00 after any garbage. Overhead: one byte per
started run of 254 non-zero bytes. Both functions are pure.

>>> cobs_encode(b"\\x11\\x00\\x22")
b'\\x02\\x11\\x02"'
>>> cobs_decode(cobs_encode(b"\\x00\\x00"))
b'\\x00\\x00'
"""
from __future__ import annotations


class CobsError(ValueError):
    """The bytes are not a valid COBS encoding."""


def cobs_encode(data: bytes) -> bytes:
    """Encode ``data`` (any bytes) into a block with no 0x00 (delimiter not appended)."""
    out = bytearray()
    for piece in bytes(data).split(b"\x00"):
        while len(piece) >= 254:
            out.append(0xFF)
            out += piece[:254]
            piece = piece[254:]
        out.append(len(piece) + 1)
        out += piece
    return bytes(out)


def cobs_decode(block: bytes) -> bytes:
    """Decode one block (without its 0x00 delimiter); raise ``CobsError`` if malformed."""
    out = bytearray()
    i = 0
    n = len(block)
    if n == 0:
        raise CobsError("empty block")
    while i < n:
        code = block[i]
        if code == 0:
            raise CobsError(f"0x00 inside block at offset {i}")
        j = i + code
        if j > n:
            raise CobsError(f"code 0x{code:02x} at offset {i} runs past the end")
        chunk = block[i + 1:j]
        if 0 in chunk:
            raise CobsError("0x00 inside block")
        out += chunk
        if code != 0xFF and j < n:
            out.append(0)
        i = j
    return bytes(out)
