"""Decode throughput of the serial link's pure path (firmware_bridge codec + session, and
text mode), on one core, measured in CPU time (time.process_time), not wall time.

    edge bench serial --out bench_serial.json

For each case it builds a byte stream as a device would send it, feeds it in
``--chunk``-byte reads (what the link's reader thread gets from pyserial) and reports
frames/s and samples/s per CPU second, and the share of one core needed per 1 Mbit/s of
serial data (target: < 25 % at 1 Mbit/s). Bytes are counted as serial payload bytes (8
bits each; a UART's start/stop bits would make the line rate 25 % higher).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from firmware_bridge import messages as m
from firmware_bridge.codec import FrameDecoder, encode_frame
from firmware_bridge.session import BinarySession
from firmware_bridge.text import TextStream


def binary_stream(n_frames: int, block: int, channels: int, fmt: str, seed: int = 0) -> tuple[bytes, int]:
    rng = np.random.default_rng(seed)
    hello = m.Hello("bench", "1", 1000.0, m.FORMAT_NAMES[fmt], tuple(f"c{i}" for i in range(channels)),
                    ("u",) * channels, scale=1 / 4096)
    parts = [encode_frame(hello)]
    for i in range(n_frames):
        v = rng.normal(0, 2000, (block, channels))
        v = v.astype(np.int16) if fmt == "int16" else v.astype(np.float32)
        parts.append(encode_frame(m.Samples(i % 65536, int(i * block * 1000) % 2**32, 1000.0, v)))
    return b"".join(parts), n_frames * block


def text_stream(n_lines: int, channels: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    v = rng.normal(0, 1, (n_lines, channels))
    return "".join(",".join(f"{x:.4f}" for x in row) + "\r\n" for row in v).encode()


def run_binary(data: bytes, chunk: int) -> tuple[float, int, int]:
    dec, ses = FrameDecoder(), BinarySession()
    frames = samples = 0
    t0 = time.process_time()
    for i in range(0, len(data), chunk):
        arrival = 1000.0 + i * 8e-6  # 1 Mbit/s pacing, for the clock mapping
        for msg in dec.feed(data[i:i + chunk]):
            for ev in ses.on_message(msg, arrival):
                if ev[0] == "samples":
                    frames += 1
                    samples += len(ev[2])
    return time.process_time() - t0, frames, samples


def run_text(data: bytes, chunk: int) -> tuple[float, int, int]:
    ts = TextStream(sample_rate=1000.0)
    samples = 0
    t0 = time.process_time()
    for i in range(0, len(data), chunk):
        for _, v in ts.feed(data[i:i + chunk], 1000.0 + i * 8e-6):
            samples += len(v)
    return time.process_time() - t0, samples, samples


def run_pty(data: bytes, chunk: int, paced_bps: float | None = None) -> tuple[float, int, int]:
    """End to end: a writer thread pushes ``data`` into a real pty, SerialLink reads it.
    CPU = the reader thread's own time (time.thread_time, sampled in its callbacks)."""
    import os
    import threading
    import tty

    from firmware_bridge.link import SerialLink

    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    got = {"frames": 0, "samples": 0, "cpu0": None, "cpu": 0.0}

    def on_samples(t, v):
        if got["cpu0"] is None:
            got["cpu0"] = time.thread_time()
        got["frames"] += 1
        got["samples"] += len(v)
        got["cpu"] = time.thread_time() - got["cpu0"]

    link = SerialLink(port=path, on_samples=on_samples, autostart=False, read_timeout=0.05)
    link.start()
    time.sleep(0.3)
    hello_end = data.index(b"\x00") + 1
    os.write(master, data[:hello_end])  # HELLO first, then the samples, as fast as the pty takes them
    time.sleep(0.1)
    view = memoryview(data)[hello_end:]
    t_next = time.monotonic()
    while view:
        view = view[os.write(master, view[:chunk]):]
        if paced_bps:  # a real 1 Mbit/s link: small writes at the line rate, the reader wakes for each
            t_next += chunk * 8 / paced_bps
            while time.monotonic() < t_next:
                pass
    end = time.monotonic() + 30
    total = data.count(b"\x00") - 1
    while got["frames"] < total and time.monotonic() < end:
        time.sleep(0.01)
    link.stop()
    os.close(master)
    os.close(slave)
    return got["cpu"], got["frames"], got["samples"]


def measure(name: str, data: bytes, fn, chunk: int, repeat: int) -> dict:
    best = None
    for _ in range(repeat):
        cpu, frames, samples = fn(data, chunk)
        best = cpu if best is None or cpu < best else best
    mbit = len(data) * 8 / 1e6
    res = {"case": name, "bytes": len(data), "frames": frames, "samples": samples, "cpu_s": round(best, 4),
           "mbit_per_cpu_s": round(mbit / best, 2), "frames_per_cpu_s": round(frames / best),
           "samples_per_cpu_s": round(samples / best),
           "core_share_at_1_mbit_s": round(best / mbit, 4)}
    res["meets_target"] = res["core_share_at_1_mbit_s"] < 0.25
    print(f"{name:34s} {res['mbit_per_cpu_s']:8.2f} Mbit/cpu-s {res['frames_per_cpu_s']:9d} frames/s "
          f"{res['samples_per_cpu_s']:10d} samples/s  {100 * res['core_share_at_1_mbit_s']:5.1f} % core @ 1 Mbit/s")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="edge bench serial", description=__doc__.splitlines()[0].replace("`", ""))
    ap.add_argument("--mbytes", type=float, default=4.0, help="size of each stream (MB)")
    ap.add_argument("--chunk", type=int, default=4096, help="bytes per read, as the reader thread gets them")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the fastest is kept (noisy machine)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    size = int(args.mbytes * 1e6)
    results = []
    for block, ch, fmt in ((25, 3, "int16"), (4, 3, "int16"), (10, 6, "float32")):
        frame_len = len(binary_stream(1, block, ch, fmt)[0]) - len(binary_stream(0, block, ch, fmt)[0])
        data, _ = binary_stream(max(1, size // frame_len), block, ch, fmt)
        results.append(measure(f"binary {fmt} {block}x{ch}/frame ({frame_len} B)", data, run_binary, args.chunk,
                               args.repeat))
    line = text_stream(1, 3)
    results.append(measure(f"text 3 ch/line (~{len(line)} B)", text_stream(size // len(line), 3), run_text,
                           args.chunk, args.repeat))
    for chunk in (64,):
        data, _ = binary_stream(size // 4 // 170, 25, 3, "int16")
        results.append(measure(f"binary int16 25x3, {chunk} B reads", data, run_binary, chunk, args.repeat))
    data, _ = binary_stream(size // 4 // 170, 25, 3, "int16")
    results.append(measure("pty end to end: SerialLink, int16 25x3", data, run_pty, args.chunk, args.repeat))
    data, _ = binary_stream(int(1e6 / 8 * 3 / 170), 25, 3, "int16")  # 3 s at 1 Mbit/s
    results.append(measure("pty paced 1 Mbit/s, 64 B writes", data,
                           lambda d, c: run_pty(d, 64, paced_bps=1e6), args.chunk, 1))
    meta = {"python": platform.python_version(), "machine": platform.machine(), "chunk": args.chunk,
            "mbytes": args.mbytes, "command": "edge bench serial --out bench_serial.json"}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
