"""What this CPU can do for int8, and which ONNX Runtime quantization formats suit it. Pure.

ONNX Runtime's quantization guide: on x86-64 the u8s8 kernels use ``VPMADDUBSW`` on
AVX2 / AVX-512 without VNNI, whose 16-bit intermediate can saturate; there it advises
``reduce_range`` (7-bit weights) or u8u8. With VNNI (``avx512_vnni``, ``avx_vnni``)
the dot product is exact and u8s8 is the fast path. On ARM, s8s8 is the default and
the dot-product extension (``asimddp``) is what makes int8 pay. Which of the suitable
formats is fastest *and* accurate enough is measured, not assumed (``edge.serve.choice``).
"""
from __future__ import annotations

import os
import platform as _platform
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class CpuFeatures:
    """The int8-relevant features of a CPU, from ``/proc/cpuinfo`` flags."""

    arch: str  # "x86_64" | "aarch64" | other ``platform.machine()``
    avx2: bool = False
    avx512: bool = False  # avx512f + avx512bw
    vnni: bool = False  # avx512_vnni or avx_vnni
    amx: bool = False  # amx_int8
    dotprod: bool = False  # ARM asimddp

    @property
    def int8_dot(self) -> bool:
        """True where int8 dot-product instructions exist (VNNI on x86, dotprod on ARM)."""
        return self.vnni or self.dotprod

    def summary(self) -> str:
        """One line for tables and logs.

        >>> CpuFeatures("x86_64", avx2=True).summary()
        'x86_64 avx2 (no int8 dot-product)'
        """
        names = [n for n in ("avx2", "avx512", "vnni", "amx", "dotprod") if getattr(self, n)]
        tail = "" if self.int8_dot else " (no int8 dot-product)"
        return f"{self.arch} {' '.join(names) or 'baseline'}{tail}"

    def to_dict(self) -> dict:
        return {**asdict(self), "int8_dot": self.int8_dot}


def parse_cpuinfo(text: str, machine: str) -> CpuFeatures:
    """Features from the text of ``/proc/cpuinfo`` (x86 ``flags`` or ARM ``Features`` line).

    >>> parse_cpuinfo("flags\\t: fpu avx2 avx512f avx512bw avx512_vnni\\n", "x86_64").vnni
    True
    >>> parse_cpuinfo("Features\\t: fp asimd asimddp\\n", "aarch64").dotprod
    True
    """
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
            break  # every core lists the same flags
    return CpuFeatures(arch=machine, avx2="avx2" in flags, avx512={"avx512f", "avx512bw"} <= flags,
                       vnni=bool({"avx512_vnni", "avx_vnni"} & flags), amx="amx_int8" in flags,
                       dotprod="asimddp" in flags)


def cpu_features() -> CpuFeatures:
    """This machine's features (all False where ``/proc/cpuinfo`` cannot be read).

    ``EDGE_CPUINFO`` names another file to read: under ``qemu-user`` (``qemu-x86_64 -cpu
    Haswell``, ``scripts/check-avx2.sh``) the process sees the host's ``/proc/cpuinfo``
    while ONNX Runtime's kernels follow the emulated CPU's CPUID, so the emulated CPU's
    flags have to be named for the formats to match the kernels that run.
    """
    machine = _platform.machine().lower()
    try:
        text = Path(os.environ.get("EDGE_CPUINFO") or "/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return parse_cpuinfo(text, machine)


@dataclass(frozen=True)
class QuantFormat:
    """One way of quantizing statically with ONNX Runtime (QDQ, per-channel weights)."""

    name: str  # short, used in the cache path and in reasons: "u8s8", "u8s8-rr", "s8s8", "u8u8"
    activation: str  # "u8" | "s8"
    weight: str  # "s8" | "u8"
    reduce_range: bool = False


FORMATS = {f.name: f for f in (QuantFormat("u8s8", "u8", "s8"), QuantFormat("u8s8-rr", "u8", "s8", True),
                               QuantFormat("s8s8", "s8", "s8"), QuantFormat("u8u8", "u8", "u8"))}


def int8_formats(cpu: CpuFeatures) -> list[QuantFormat]:
    """The formats worth building on ``cpu``, the usual best first.

    >>> [f.name for f in int8_formats(CpuFeatures("x86_64", avx2=True, avx512=True, vnni=True))]
    ['u8s8', 's8s8']
    >>> [f.name for f in int8_formats(CpuFeatures("x86_64", avx2=True))]
    ['u8s8-rr', 'u8u8']
    >>> [f.name for f in int8_formats(CpuFeatures("aarch64", dotprod=True))]
    ['s8s8']
    """
    if cpu.arch in ("aarch64", "arm64"):
        return [FORMATS["s8s8"]]
    if cpu.vnni:
        return [FORMATS["u8s8"], FORMATS["s8s8"]]
    return [FORMATS["u8s8-rr"], FORMATS["u8u8"]]
