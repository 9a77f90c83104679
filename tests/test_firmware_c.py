"""C reference implementation vs Python codec: same bytes in both directions, compiled here."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from firmware_bridge.codec import decode_frames, encode_body, encode_frame
from firmware_bridge.vectors import VECTORS, encoded_vectors

C_DIR = Path(__file__).resolve().parents[1] / "firmware_bridge" / "c"
CC = shutil.which("cc") or shutil.which("gcc")
CXX = shutil.which("c++") or shutil.which("g++")
FLAGS = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"]

pytestmark = [pytest.mark.skipif(CC is None, reason="no C compiler (cc/gcc) on PATH"), pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def tool(tmp_path_factory):
    exe = tmp_path_factory.mktemp("c") / "vectors"
    subprocess.run([CC, *FLAGS, "-DEF_MAX_PAYLOAD=1024", "-o", str(exe), str(C_DIR / "tools" / "vectors.c"),
                    str(C_DIR / "edgeframe.c")], check=True, capture_output=True, timeout=60)
    return exe


def run(tool, mode, stdin=""):
    return subprocess.run([str(tool), mode], input=stdin, capture_output=True, text=True, check=True,
                          timeout=10).stdout.splitlines()


def test_c_encoder_writes_the_same_bytes_as_python(tool):
    c_frames = dict(line.split() for line in run(tool, "encode"))
    for name, frame in encoded_vectors():
        assert c_frames[name] == frame.hex(), name


def test_python_decodes_every_c_frame_to_the_vector(tool):
    c_frames = dict(line.split() for line in run(tool, "encode"))
    for name, msg in VECTORS:
        assert decode_frames(bytes.fromhex(c_frames[name])) == ([msg], b"", []), name


def test_c_decoder_accepts_python_frames_after_garbage_and_rejects_corruption(tool):
    rng = np.random.default_rng(3)
    stream, expected = b"", []
    for _, msg in VECTORS:
        garbage = rng.integers(0, 256, 40, dtype=np.uint8).tobytes()
        stream += garbage + b"\x00" + encode_frame(msg)
        typ, body = encode_body(msg)
        expected.append(f"FRAME {typ:02x} {body.hex()}".strip())
    bad = bytearray(encode_frame(VECTORS[0][1]))
    bad[3] ^= 0x40
    lines = run(tool, "decode", (stream + bytes(bad)).hex())
    assert [ln.strip() for ln in lines if ln.startswith("FRAME")] == expected
    assert lines[-1] == "ERROR -4"  # EF_ERR_CRC


def test_c_decoder_rejects_oversize_frames_at_the_small_mcu_limit(tmp_path):
    exe = tmp_path / "small"
    subprocess.run([CC, *FLAGS, "-DEF_MAX_PAYLOAD=64", "-o", str(exe), str(C_DIR / "tools" / "vectors.c"),
                    str(C_DIR / "edgeframe.c")], check=True, capture_output=True, timeout=60)
    long_frame = dict(encoded_vectors())["samples_long"]
    lines = run(exe, "decode", (long_frame + encode_frame(VECTORS[9][1])).hex())
    assert lines == ["ERROR -1", "FRAME 81 2a00"]


ARDUINO_STUB = """
#include <stdint.h>
#include <stddef.h>
#define A0 0
#define A1 1
#define A2 2
#define A5 5
#define INPUT_PULLUP 2
#define LOW 0
struct SerialStub { void begin(long) {} int available() { return 0; } int read() { return -1; }
                    size_t write(const uint8_t *, size_t n) { return n; } };
static SerialStub Serial;
inline int analogRead(int) { return 512; }
inline int digitalRead(int) { return 1; }
inline void pinMode(int, int) {}
inline uint32_t micros() { return 0; }
inline void randomSeed(long) {}
inline long random(long a, long) { return a; }
"""


@pytest.mark.skipif(CXX is None, reason="no C++ compiler to build the Arduino sketch against a stub")
def test_arduino_example_sketch_compiles_against_a_stub_core(tmp_path):
    (tmp_path / "Arduino.h").write_text(ARDUINO_STUB)
    sketch = (C_DIR / "examples" / "arduino_accel" / "arduino_accel.ino").read_text()
    (tmp_path / "sketch.cpp").write_text('#include "Arduino.h"\n' + sketch + "\nint main() { setup(); loop(); }\n")
    obj = tmp_path / "edgeframe.o"
    subprocess.run([CC, *FLAGS, "-c", "-o", str(obj), str(C_DIR / "edgeframe.c")], check=True, timeout=60)
    subprocess.run([CXX, "-std=c++11", "-Wall", "-Werror", f"-I{C_DIR}", f"-I{tmp_path}", "-o",
                    str(tmp_path / "sketch"), str(tmp_path / "sketch.cpp"), str(obj)],
                   check=True, capture_output=True, timeout=60)
