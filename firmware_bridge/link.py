"""SerialLink: one device on a serial port (a path or any pyserial URL), read by a
dedicated thread, decoded with the pure codec and session, handed to callbacks.

It resynchronises after garbage (COBS: at the next 0x00), counts decode errors by kind,
lost frames, resets, disconnects and reconnects; when the port vanishes (USB unplug) it
retries opening the same path every ``retry_interval`` seconds until the device is back.
In binary mode it asks for HELLO (and sends START when ``autostart``) on every connect
and every HELLO, and asks again every ``hello_interval`` s while samples arrive without one.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np
import serial

from firmware_bridge import messages as m
from firmware_bridge.codec import FrameDecoder, encode_frame, short_repr
from firmware_bridge.session import BinarySession
from firmware_bridge.text import TextStream

log = logging.getLogger("firmware_bridge.link")

SamplesCallback = Callable[[np.ndarray, np.ndarray], None]


class SerialLink:
    """Read one serial device in a thread named ``serial-<name>``.

    ``on_samples(t [n] float64 Unix seconds, v [n, C] float32)``, ``on_label(t, label)``,
    ``on_hello(Hello)`` are called from the reader thread; an exception in one is counted
    (``callback_errors``), logged, and does not stop the link. An exception while decoding
    a read (a decoder bug met by hostile bytes) is counted (``handle_errors``), the partial
    frame is dropped (the decoder resyncs at the next delimiter), and the link reads on.
    Both are also handed to ``on_error(exc, where)`` when given (the daemon's supervisor);
    ``fault_point()``, when given, is called before each read is decoded (fault injection).
    """

    def __init__(self, *, port: str, on_samples: SamplesCallback, baud: int = 115200, protocol: str = "binary",
                 on_label: Callable[[float, object], None] | None = None,
                 on_hello: Callable[[m.Hello], None] | None = None,
                 sample_rate: float | None = None, channels: int | None = None, autostart: bool = True,
                 retry_interval: float = 0.2, read_timeout: float = 0.05, hello_interval: float = 1.0,
                 tolerance: float = 0.5, text_min_seconds: float = 1.0, name: str | None = None,
                 clock: Callable[[], float] = time.time,
                 on_error: Callable[[BaseException, str], None] | None = None,
                 fault_point: Callable[[], None] | None = None):
        if protocol not in ("binary", "text"):
            raise ValueError(f"protocol = {protocol!r}; expected 'binary' or 'text'")
        self.port, self.baud, self.protocol = port, baud, protocol
        self.name = name or port
        self._on_samples, self._on_label, self._on_hello = on_samples, on_label, on_hello
        self.autostart, self.retry_interval, self.read_timeout = autostart, retry_interval, read_timeout
        self.hello_interval = hello_interval
        self._clock = clock
        self._on_error, self._fault_point = on_error, fault_point
        self._decoder = FrameDecoder()
        self._session = BinarySession(tolerance=tolerance)
        self._text = TextStream(sample_rate=sample_rate, channels=channels, min_seconds=text_min_seconds,
                                tolerance=tolerance)
        self._counters = dict.fromkeys(("bytes", "connects", "reconnects", "disconnects", "open_failures",
                                        "callback_errors", "handle_errors"), 0)
        self._stop = threading.Event()
        self._write_lock = threading.Lock()
        self._serial: serial.SerialBase | None = None
        self._thread: threading.Thread | None = None
        self._last_log: dict[str, float] = {}
        self._last_hello_request = 0.0

    @property
    def hello(self) -> m.Hello | None:
        return self._session.hello

    @property
    def connected(self) -> bool:
        return self._serial is not None

    @property
    def thread(self) -> threading.Thread | None:
        """The reader thread while started (for a supervisor to watch)."""
        return self._thread

    @property
    def text_channels(self) -> tuple[str, ...] | None:
        """Channel names from a text-mode header line, if the device sent one."""
        return self._text.names

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"serial-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        ser = self._serial
        if ser is not None:
            try:
                ser.cancel_read()
            except (AttributeError, OSError, serial.SerialException):
                pass
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def send(self, msg: m.Message) -> bool:
        """Write one command frame; False if the port is not open or the write failed."""
        ser = self._serial
        if ser is None:
            return False
        try:
            with self._write_lock:
                ser.write(encode_frame(msg))
            return True
        except (serial.SerialException, OSError) as e:
            self._warn("write", f"write to {self.port} failed: {e}")
            return False

    def stats(self) -> dict[str, int | float]:
        """Counters: bytes, frames, samples, lost_frames, resets, connects, reconnects,
        disconnects, decode errors by kind (crc, cobs, short, version, type, malformed,
        oversize; text: columns, text_parse, overlong), callback_errors, ..."""
        out: dict[str, int | float] = dict(self._counters)
        if self.protocol == "binary":
            out.update(self._session.counters)
            out.update({k: 0 for k in ("crc", "cobs", "short", "version", "type", "malformed", "oversize")})
            out.update(self._decoder.errors)
            out["crc_errors"] = out["crc"]
            out["decode_errors"] = sum(self._decoder.errors.values())
        else:
            out.update(self._text.counters)
            out["frames"] = out["lines"]
            out["decode_errors"] = out["columns"] + out["text_parse"] + out["overlong"]
            out["sample_rate"] = self._text.sample_rate or 0.0
        return out

    # -- the reader thread -------------------------------------------------------------

    def _warn(self, kind: str, text: str) -> None:
        now = time.monotonic()
        if now - self._last_log.get(kind, -1e9) >= 60.0:
            self._last_log[kind] = now
            log.warning("serial %s: %s", self.name, text)

    def _open(self) -> bool:
        try:
            ser = serial.serial_for_url(self.port, baudrate=self.baud, timeout=self.read_timeout, write_timeout=1.0)
        except (serial.SerialException, OSError, ValueError) as e:
            self._counters["open_failures"] += 1
            self._warn("open", f"cannot open {self.port}: {e}; retrying every {self.retry_interval} s")
            return False
        self._counters["reconnects" if self._counters["connects"] else "connects"] += 1
        if self._counters["reconnects"]:
            log.info("serial %s: reconnected to %s", self.name, self.port)
        self._decoder.reset()
        self._session.reconnected()
        self._text.restart()
        self._serial = ser
        if self.protocol == "binary":
            self._request_hello()
        return True

    def _close(self) -> None:
        ser, self._serial = self._serial, None
        if ser is not None:
            try:
                ser.close()
            except (serial.SerialException, OSError):
                pass

    def _request_hello(self) -> None:
        self._last_hello_request = time.monotonic()
        self.send(m.GetHello())
        if self.autostart:
            self.send(m.Start())

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._serial is None and not self._open():
                    self._stop.wait(self.retry_interval)
                    continue
                ser = self._serial
                try:
                    data = ser.read(ser.in_waiting or 1)
                except (serial.SerialException, OSError, TypeError) as e:
                    if self._stop.is_set():
                        break
                    self._counters["disconnects"] += 1
                    self._warn("disconnect", f"{self.port} went away: {e}")
                    self._close()
                    continue
                if data:
                    self._counters["bytes"] += len(data)
                    try:
                        if self._fault_point is not None:
                            self._fault_point()
                        self._handle(data, self._clock())
                    except Exception as e:  # one read, however hostile, must not end the reader
                        self._counters["handle_errors"] += 1
                        self._decoder.reset()
                        self._warn("handle", f"decoding a read of {len(data)} bytes from {self.port} raised "
                                             f"{short_repr(e, 200)}; dropped it and resynced")
                        self._report(e, f"a read of {len(data)} bytes")
        finally:
            self._close()

    def _handle(self, data: bytes, arrival: float) -> None:
        if self.protocol == "text":
            for t, v in self._text.feed(data, arrival):
                self._call(self._on_samples, t, v)
            return
        for msg in self._decoder.feed(data):
            for ev in self._session.on_message(msg, arrival):
                kind = ev[0]
                if kind == "samples":
                    self._call(self._on_samples, ev[1], ev[2])
                elif kind == "label" and self._on_label is not None:
                    self._call(self._on_label, ev[1], ev[2])
                elif kind == "hello":
                    if self._on_hello is not None:
                        self._call(self._on_hello, ev[1])
                    if self.autostart:
                        self.send(m.Start())
                elif kind == "need_hello" and time.monotonic() - self._last_hello_request > self.hello_interval:
                    self._request_hello()
        for err in self._decoder.last_errors:
            self._warn(err.kind, f"bad frame ({err.kind}): {err.detail}")

    def _call(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # a sink bug must not kill the reader thread
            self._counters["callback_errors"] += 1
            self._warn("callback", f"callback {short_repr(getattr(fn, '__name__', fn))} raised {short_repr(e, 200)}")
            self._report(e, f"callback {short_repr(getattr(fn, '__name__', fn))}")

    def _report(self, exc: BaseException, where: str) -> None:
        if self._on_error is not None:
            try:
                self._on_error(exc, where)
            except Exception:  # the reporter's own failure is not the link's
                log.exception("serial %s: on_error raised", self.name)
