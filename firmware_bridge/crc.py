"""CRC-16/CCITT-FALSE, the frame check of the protocol.

Parameters (Rocksoft model): width 16, poly 0x1021, init 0xFFFF, refin false,
refout false, xorout 0x0000, check 0x29B1 (the CRC of the ASCII bytes "123456789").
``binascii.crc_hqx`` computes exactly this polynomial unreflected, in C, so the hot
path never loops per byte in Python.

>>> hex(crc16(b"123456789"))
'0x29b1'
"""
from __future__ import annotations

import binascii

CRC_NAME = "CRC-16/CCITT-FALSE"
CRC_CHECK = 0x29B1
_INIT = 0xFFFF


def crc16(data: bytes, crc: int = _INIT) -> int:
    """CRC-16/CCITT-FALSE of ``data``; pass a previous result as ``crc`` to continue."""
    return binascii.crc_hqx(data, crc)
