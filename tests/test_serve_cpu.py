"""CPU features -> ONNX Runtime int8 formats, and every format built for real on this CPU
(its speed is measured by the choice; here only that it builds, caches apart and passes)."""
from __future__ import annotations

import pytest

from edge.serve import compile_model
from edge.errors import ParityError
from edge.serve.cpu import FORMATS, CpuFeatures, cpu_features, int8_formats, parse_cpuinfo
from edge.serve.testing import make_tiny_model

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma bmi2\n"
SKYLAKE_X = "flags\t: avx avx2 avx512f avx512bw avx512vl avx512cd\n"
ORIN = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp lrcpc\n"


@pytest.mark.parametrize("text, machine, formats, dot", [
    (AVX2_ONLY, "x86_64", ["u8s8-rr", "u8u8"], False),
    (SKYLAKE_X, "x86_64", ["u8s8-rr", "u8u8"], False),  # AVX-512 without VNNI saturates like AVX2
    (SKYLAKE_X.replace("avx512cd", "avx512cd avx512_vnni"), "x86_64", ["u8s8", "s8s8"], True),
    ("flags\t: avx2 avx_vnni\n", "x86_64", ["u8s8", "s8s8"], True),
    (ORIN, "aarch64", ["s8s8"], True),
    ("Features\t: fp asimd\n", "aarch64", ["s8s8"], False),
])
def test_formats_follow_the_cpu(text, machine, formats, dot):
    cpu = parse_cpuinfo(text, machine)

    assert [f.name for f in int8_formats(cpu)] == formats and cpu.int8_dot is dot


def test_reduce_range_is_only_used_without_vnni():
    assert FORMATS["u8s8-rr"].reduce_range and not FORMATS["u8s8"].reduce_range
    assert all(not f.reduce_range for f in int8_formats(CpuFeatures("x86_64", avx2=True, vnni=True)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.mark.parametrize("variant", sorted(FORMATS))
def test_every_format_builds_and_the_ones_this_cpu_picks_pass_their_gate(tiny, tmp_path_factory, variant):
    """What the project promises on the CPU the test runs on: the formats ``int8_formats``
    picks pass; the others (s8s8 and u8s8 saturate without VNNI) pass or are refused by the
    gate with a ``ParityError``, and are never offered to the choice (next test)."""
    from edge.serve.cache import ArtifactCache
    from edge.serve.compile import obtain

    cache = tmp_path_factory.getbasetemp() / "formats-cache"
    picked = variant in [f.name for f in int8_formats(cpu_features())]
    try:
        backend, result = obtain(tiny, "onnxruntime", "int8", variant=variant, cache=ArtifactCache(cache))
    except ParityError:
        assert not picked, f"{variant} is picked for {cpu_features().summary()} and must pass its gate"
        return
    assert result.parity.passed, result.parity.summary()
    assert backend.variant == variant and result.artifact_dir.name.startswith(f"onnxruntime-int8-{variant}-")


def test_only_the_formats_this_cpu_picks_are_candidates():
    from edge.serve.backends.ort import OnnxRuntimeBackend

    assert OnnxRuntimeBackend.variants("int8") == [f.name for f in int8_formats(cpu_features())]


def test_an_emulated_cpu_can_name_its_own_cpuinfo(tmp_path, monkeypatch):
    # qemu-user shows the host's /proc/cpuinfo, not the emulated CPU's: EDGE_CPUINFO says which
    (tmp_path / "cpuinfo").write_text(AVX2_ONLY)
    monkeypatch.setenv("EDGE_CPUINFO", str(tmp_path / "cpuinfo"))

    assert [f.name for f in int8_formats(cpu_features())] == ["u8s8-rr", "u8u8"]


def test_compile_names_the_format_it_built(tiny, tmp_path):
    r = compile_model(tiny, backend="onnxruntime", precision="int8", cache_dir=tmp_path, progress=False)

    assert r.variant in FORMATS and r.summary().startswith(f"onnxruntime int8 ({r.variant})")
