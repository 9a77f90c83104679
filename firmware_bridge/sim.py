"""FirmwareSim: an emulated microcontroller on a pseudo-terminal pair.

The host opens ``sim.path`` (a symlink to the pty's slave end) exactly as it would open
/dev/ttyACM0. Like an Arduino with auto-reset, the emulated MCU boots when the host
opens the port (after ``boot_delay``), sends HELLO and, if ``autostart``, streams;
in binary mode it obeys host commands (PING, SET_RATE, START, STOP, GET_HELLO).

The sensor data is handed in: ``source(n) -> (t [n], v [n, C])`` (e.g. ``edge.sim.Machine.read``),
so this module never imports ``edge``. Faults on demand: ``inject_bytes`` /
``inject_noise`` (garbage on the wire), ``drop_frames`` (frames built but not sent, so
sequence numbers skip), ``reset`` (reboot: new boot id, clock and sequence from 0),
``unplug`` / ``replug`` (the pty is closed; a new one appears under the same path).
``sent`` records every sample block as the host should decode it.
"""
from __future__ import annotations

import collections
import errno
import os
import queue
import select
import shutil
import tempfile
import threading
import time
import tty
from typing import Callable

import numpy as np

from firmware_bridge import messages as m
from firmware_bridge.codec import FrameDecoder, encode_frame

Source = Callable[[int], tuple[np.ndarray, np.ndarray]]


class FirmwareSim:
    def __init__(self, *, source: Source, protocol: str = "binary", device_id: str = "sim-mcu",
                 firmware: str = "sim 1.0", channels: tuple[str, ...] = ("ax", "ay", "az"),
                 units: tuple[str, ...] = ("g", "g", "g"), sample_rate: float = 1000.0,
                 sample_format: str = "int16", scale: float = 1.0 / 4096, block: int = 25,
                 autostart: bool = True, max_frames: int | None = None, speed: float = 1.0,
                 boot_delay: float = 0.05, text_header: bool = False, decimals: int = 4,
                 clock_start_us: int = 0, heartbeat_interval: float = 1.0, seed: int = 0,
                 link_dir: str | None = None, keep_sent: int | None = None):
        if protocol not in ("binary", "text"):
            raise ValueError(f"protocol = {protocol!r}; expected 'binary' or 'text'")
        self.source, self.protocol = source, protocol
        self.device_id, self.firmware = device_id, firmware
        self.channels, self.units = tuple(channels), tuple(units)
        self.sample_rate, self.fmt = float(sample_rate), m.FORMAT_NAMES[sample_format]
        self.scale = scale if self.fmt == m.FORMAT_INT16 else 1.0
        self.block, self.autostart, self.max_frames = block, autostart, max_frames
        self.speed, self.boot_delay, self.text_header, self.decimals = speed, boot_delay, text_header, decimals
        self.clock_start_us, self.heartbeat_interval = clock_start_us, heartbeat_interval
        self._rng = np.random.default_rng(seed)
        self._own_dir = link_dir is None
        self.link_dir = link_dir or tempfile.mkdtemp(prefix="edge-sim-")
        self.path = os.path.join(self.link_dir, "ttyEDGE")
        # what was sent, as the host should see it (for tests); keep_sent bounds it for long runs
        self.sent: collections.deque[np.ndarray] = collections.deque(maxlen=keep_sent)
        self.counters = dict.fromkeys(("frames_sent", "frames_dropped", "samples_sent", "boots", "commands",
                                       "overruns", "labels_sent"), 0)
        self._tasks: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._master: int | None = None
        self._host_open = False
        self._drop = 0
        self._thread: threading.Thread | None = None
        self._plug()

    # -- control, from any thread (run on the sim thread) ------------------------------

    def start(self) -> "FirmwareSim":
        self._thread = threading.Thread(target=self._run, name="firmware-sim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        self._unplug()
        if self._own_dir:
            shutil.rmtree(self.link_dir, ignore_errors=True)

    def __enter__(self) -> "FirmwareSim":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _do(self, fn: Callable[[], None]) -> None:
        done = threading.Event()
        self._tasks.put((fn, done))
        if not done.wait(5.0):
            raise TimeoutError("firmware simulator did not run the request")

    def inject_bytes(self, data: bytes) -> None:
        self._do(lambda: self._write(data))

    def inject_noise(self, n: int) -> None:
        """Write ``n`` random bytes (0x00 included in binary mode; printable garbage in text mode)."""
        if self.protocol == "binary":
            noise = self._rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        else:
            noise = bytes(self._rng.choice(list(b"xyz#@!?;:"), n).astype(np.uint8)) + b"\r\n"
        self.inject_bytes(noise)

    def drop_frames(self, n: int) -> None:
        """Build the next ``n`` sample frames (sequence numbers advance) but do not send them."""
        def go() -> None:
            self._drop += n
        self._do(go)

    def reset(self) -> None:
        """Reboot the MCU: new boot id, clock and sequence from zero, HELLO again."""
        self._do(self._boot)

    def send_label(self, label: int | float | str) -> None:
        def go() -> None:
            self._write(encode_frame(m.Label(self._now_us(), label)))
            self.counters["labels_sent"] += 1
        self._do(go)

    def unplug(self) -> None:
        """The USB cable is pulled: the pty closes and the path disappears."""
        self._do(self._unplug)

    def replug(self) -> None:
        """The cable is back: a new pty appears under the same path; the MCU boots when opened."""
        self._do(self._plug)

    # -- the emulated MCU ----------------------------------------------------------------

    def _plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # what a USB CDC port looks like: no echo, no line discipline
        tmp = self.path + ".new"
        os.symlink(os.ttyname(slave), tmp)
        os.replace(tmp, self.path)
        os.close(slave)
        os.set_blocking(master, False)
        self._master, self._host_open, self._streaming = master, False, False

    def _unplug(self) -> None:
        if self._master is not None:
            os.close(self._master)
            self._master = None
        self._host_open = False
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _boot(self) -> None:
        self.counters["boots"] += 1
        self._boot_id = int(self._rng.integers(1, 65536))
        self._seq, self._k, self._frames = 0, 0, 0
        self._t_boot = time.monotonic()
        self._next_due = self._t_boot
        self._last_beat = self._t_boot
        self._decoder = FrameDecoder()
        self._streaming = self.autostart or self.protocol == "text"
        if self.protocol == "binary":
            self._write(encode_frame(self._hello()))
        elif self.text_header:
            self._write(",".join(self.channels).encode() + b"\r\n")

    def _now_us(self) -> int:
        return int(self.clock_start_us + (time.monotonic() - self._t_boot) * 1e6 * self.speed) % (1 << 32)

    def _hello(self) -> m.Hello:
        return m.Hello(self.device_id, self.firmware, self.sample_rate, self.fmt, self.channels, self.units,
                       self.scale, self._boot_id, self._now_us())

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + 0.5
        while view and self._master is not None:
            try:
                view = view[os.write(self._master, view):]
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.counters["overruns"] += 1  # like a UART without flow control: bytes are lost
                    return
                select.select([], [self._master], [], 0.01)
            except OSError as e:
                if e.errno in (errno.EIO, errno.EBADF):
                    return
                raise

    def _command(self, msg: m.Message) -> None:
        self.counters["commands"] += 1
        if isinstance(msg, m.GetHello):
            self._write(encode_frame(self._hello()))
        elif isinstance(msg, m.Start):
            if not self._streaming:
                self._streaming, self._next_due = True, time.monotonic()
        elif isinstance(msg, m.Stop):
            self._streaming = False
        elif isinstance(msg, m.SetRate) and msg.sample_rate > 0:
            self.sample_rate = msg.sample_rate
            self._write(encode_frame(self._hello()))
        elif isinstance(msg, m.Ping):
            self._write(encode_frame(m.Pong(msg.token, self._now_us())))

    def _emit(self) -> None:
        _, v = self.source(self.block)
        v = np.asarray(v, np.float64).reshape(self.block, -1)
        t_us = int(self.clock_start_us + self._k * 1e6 / self.sample_rate) % (1 << 32)
        self._k += self.block
        self._frames += 1
        if self.protocol == "text":
            lines = "".join(",".join(f"{x:.{self.decimals}f}" for x in row) + "\r\n" for row in v)
            data, host_view = lines.encode(), np.array([[float(f"{x:.{self.decimals}f}") for x in row] for row in v],
                                                      np.float32)
        else:
            if self.fmt == m.FORMAT_INT16:
                raw = np.clip(np.rint(v / self.scale), -32768, 32767).astype(np.int16)
                host_view = raw.astype(np.float32) * np.float32(self.scale)
            else:
                raw = v.astype(np.float32)
                host_view = raw
            data = encode_frame(m.Samples(self._seq, t_us, self.sample_rate, raw))
            self._seq = (self._seq + 1) % 65536
        if self._drop:
            self._drop -= 1
            self.counters["frames_dropped"] += 1
            return
        self._write(data)
        self.sent.append(host_view)
        self.counters["frames_sent"] += 1
        self.counters["samples_sent"] += self.block

    def _run(self) -> None:
        while not self._stop.is_set():
            while not self._tasks.empty():
                fn, done = self._tasks.get()
                fn()
                done.set()
            if self._master is None:
                time.sleep(0.01)
                continue
            wait = 0.01
            if self._host_open and self._streaming and (self.max_frames is None or self._frames < self.max_frames):
                wait = min(wait, max(0.0, self._next_due - time.monotonic()))
            events = select.poll()
            events.register(self._master, select.POLLIN)
            ready = events.poll(wait * 1000)
            hup = any(ev & select.POLLHUP for _, ev in ready)
            if hup:
                self._host_open = False  # port closed: the bytes would go nowhere
                time.sleep(0.01)
                continue
            if not self._host_open:
                self._host_open = True
                time.sleep(self.boot_delay)
                self._boot()
            if any(ev & select.POLLIN for _, ev in ready):
                try:
                    data = os.read(self._master, 4096)
                except OSError:
                    data = b""
                for msg in self._decoder.feed(data):
                    self._command(msg)
            now = time.monotonic()
            if self._streaming and (self.max_frames is None or self._frames < self.max_frames):
                if now >= self._next_due:
                    self._emit()
                    self._next_due += self.block / (self.sample_rate * self.speed)
            elif self.protocol == "binary" and now - self._last_beat >= self.heartbeat_interval:
                self._last_beat = now
                self._write(encode_frame(m.Heartbeat(self._now_us(), int(self._streaming))))
