"""Serial source: a microcontroller on a UART/USB port, through firmware_bridge.

``[[sources]] type = "serial"`` builds one ``SerialSource``. Samples go to the sink as
``sink.push_samples(StreamKey(device, stream), t [n] float64, v [n, C] float32)`` and
LABEL frames as ``sink.push_label(key, t, label)``, exactly like MQTT sources.

Channel mapping: ``channels`` picks and orders the device's channels, by name (from
HELLO, or a text-mode header line) or by index; None keeps them all in device order.

Device names: unless the config gives ``device``, the stream is named by the HELLO's
device id, which must fit the name rule of ``edge.ingest.names``. A HELLO whose id does
not is counted (``bad_hello``) and logged (rate-limited, the id cut short), and the
device's samples and labels are dropped (``unnamed_samples``, ``unnamed_labels``) until a
HELLO with a valid id arrives.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from edge.errors import ConfigError, DecodeError, brief
from edge.ingest.names import check_name
from edge.ingest.types import StreamKey
from edge.observe import RateLimitedLog
from firmware_bridge.link import SerialLink
from firmware_bridge.messages import Hello

log = logging.getLogger("edge.ingest.serial")
_badlog = RateLimitedLog(log)


class SerialSource:
    """One serial device as a stream source; ``start()``, ``stop()``, ``stats()``."""

    def __init__(self, *, name: str, port: str, sink, baud: int = 115200, protocol: str = "binary",
                 device: str | None = None, stream: str | None = None,
                 channels: Sequence[str | int] | None = None, sample_rate: float | None = None,
                 retry_interval: float = 0.5, text_min_seconds: float = 1.0, supervisor=None,
                 thread: str | None = None):
        if protocol not in ("binary", "text"):
            raise ConfigError(f"[[sources]] {name!r}: protocol = {protocol!r}; expected \"binary\" or \"text\"")
        self.name, self.sink = name, sink
        self._device, self._stream = device, stream or "serial"
        self._channels = list(channels) if channels is not None else None
        self._index: np.ndarray | None = None
        self._key: StreamKey | None = StreamKey(device, self._stream) if device else None
        self._mapping_errors = 0
        self._bad = {"bad_hello": 0, "unnamed_samples": 0, "unnamed_labels": 0}
        self._unnamed = False  # the last HELLO's device id broke the name rule
        self.link = SerialLink(port=port, baud=baud, protocol=protocol, sample_rate=sample_rate,
                               on_samples=self._on_samples, on_label=self._on_label, on_hello=self._on_hello,
                               retry_interval=retry_interval, text_min_seconds=text_min_seconds, name=name,
                               **self._supervised(supervisor, thread or f"serial:{name}"))
        if protocol == "text":
            self._key = self._key or StreamKey(name, self._stream)

    @staticmethod
    def _supervised(sup, thread: str) -> dict:
        """The link's error and fault hooks, on the daemon's supervisor (none without one)."""
        if sup is None:
            return {}
        return {"on_error": lambda e, where: sup.item_failed(thread, e, where=where),
                "fault_point": lambda: sup.fault_point(thread)}

    @property
    def key(self) -> StreamKey | None:
        """The stream key, known once the device said HELLO (or at once if ``device`` is set)."""
        return self._key

    def start(self) -> None:
        self.link.start()

    def stop(self) -> None:
        self.link.stop()

    def stats(self) -> dict[str, int | float]:
        out = self.link.stats()
        out["mapping_errors"] = self._mapping_errors
        out.update(self._bad)
        return out

    def _resolve(self, names: Sequence[str] | None, width: int) -> np.ndarray | None:
        if self._channels is None:
            return None
        idx = []
        for c in self._channels:
            if isinstance(c, int) and 0 <= c < width:
                idx.append(c)
            elif isinstance(c, str) and names is not None and c in names:
                idx.append(list(names).index(c))
            else:
                raise ConfigError(f"[[sources]] {self.name!r}: channel {c!r} is not on the device "
                                  f"(it has {brief(list(names)) if names else width} channels)")
        return np.asarray(idx, np.intp)

    def _on_hello(self, hello: Hello) -> None:
        try:
            device = check_name(hello.device_id, what="HELLO device id")
        except DecodeError as e:
            self._bad["bad_hello"] += 1
            _badlog.warn(f"bad_hello:{self.name}", "serial %s: %s", self.name, e)
            if not self._device:
                self._key, self._unnamed = None, True  # nothing is forwarded until a valid HELLO
                return
            device = self._device
        self._unnamed = False
        self._key = StreamKey(self._device or device, self._stream)
        reset = getattr(self.sink, "reset_stream", None)
        if reset is not None:  # a HELLO means the device (re)started: its partial window is not continued
            reset(self._key, "hello")
        try:
            self._index = self._resolve(hello.channels, len(hello.channels))
        except ConfigError as e:
            self._index = None
            self._mapping_errors += 1
            _badlog.warn(f"mapping:{self.name}", "%s", e)

    def _on_samples(self, t: np.ndarray, v: np.ndarray) -> None:
        if self._unnamed:
            self._bad["unnamed_samples"] += len(t)
            return
        if self._channels is not None:
            if self._index is None:
                try:
                    self._index = self._resolve(self.link.text_channels if self.link.protocol == "text"
                                                else (self.link.hello.channels if self.link.hello else None),
                                                v.shape[1])
                except ConfigError as e:
                    self._mapping_errors += 1
                    if self._mapping_errors == 1:
                        log.error("%s", e)
                    return
            v = v[:, self._index]
        self.sink.push_samples(self._key, t, np.ascontiguousarray(v, np.float32))

    def _on_label(self, t: float, label) -> None:
        if self._unnamed:
            self._bad["unnamed_labels"] += 1
            return
        self.sink.push_label(self._key, t, label)
