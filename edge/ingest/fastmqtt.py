"""The sensor subscriptions' own MQTT connection: a minimal subscriber on a raw socket.

paho's client loop spends about 30 us of CPU per received single-sample message at QoS 0
and 53 us at QoS 1 (its packet reader, an ``MQTTMessage``, the callback dispatch, one
PUBACK write per message); this reader 2 us and 4.5 us (``edge bench mqtt``, BENCHMARKS.md).
At tens of thousands of sensor messages a second that difference is most of a core. It reads large chunks and hands every PUBLISH in a
chunk to ``on_batch`` at once as ``[(topic, payload)]`` plus the receive time, decoded by
``mqttwire.parse_stream`` in one tight loop.

It only receives: CONNECT (user/password, keepalive, optional TLS), SUBSCRIBE (refused
filters are logged), QoS 0 and 1, PINGREQ while the link is quiet, and a server
DISCONNECT. MQTT 5 topic aliases are never advertised, so the broker never uses them.
One named thread (``mqtt-ingest``) owns the socket: it connects, reads, pings and
reconnects with exponential backoff (``reconnect_min_s`` .. ``reconnect_max_s``),
resubscribing each time. A malformed packet is counted (``protocol_errors``), logged,
and costs the connection (the good messages before it are still delivered and
acknowledged), never the thread. When a read brings little (the reader keeps up), the
thread waits ``linger_s`` (0.5 ms) before the next one, so that at high rates each
wakeup takes many messages.

**Session.** The client id is the caller's and must be stable across restarts. With
``[mqtt] session_expiry_s`` > 0 the session is persistent: Clean Start 0 and a Session
Expiry Interval of that many seconds (MQTT 5), Clean Session 0 (3.1.1). The broker then
keeps the subscriptions and queues QoS 1 messages while the connection is down, and
redelivers the unacknowledged ones (DUP set) when it is back. CONNACK's session-present
flag is counted (``sessions_resumed``); a reconnect that finds no session although we
had one (the broker restarted without persistence, or the session expired) is counted in
``sessions_lost`` and logged, since what was queued for us is gone. The filters are
subscribed again anyway, which is harmless. Delivery of QoS 1 is at least once: after a reconnect ``on_batch`` can get
a message it already got. ``session_expiry_s = 0`` gives clean sessions.

**Acknowledgement policy.** Every read's messages go to ``on_batch(msgs, received)`` at
once; its return value is ignored, an exception means "not taken". The PUBACKs of a read
(one coalesced write) are sent only after ``on_batch`` returned normally. When it raises:

- the failure is counted (``handoff_errors``) and logged, rate-limited, with the
  exception's type and a bounded part of its text (never a repr of the messages);
- the batch's QoS 1 messages are not acknowledged (``handoff_unacked``) and the
  connection is dropped, so that the broker redelivers them on the next connection; its
  QoS 0 messages cannot come back and are counted in ``handoff_lost``;
- poison guard: after ``poison_after`` (3) failures in a row with no success between,
  the failing batch is acknowledged anyway, its messages counted in ``handoff_lost`` and
  ``poison_batches`` counts it, so that one batch that always fails cannot stall the
  stream in a reconnect loop. The reconnect after a failed hand-off uses the growing
  backoff, so a hand-off that keeps failing does not spin.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Callable

from edge.config import MqttConfig
from edge.ingest import mqttwire as wire
from edge.observe import RateLimitedLog

log = logging.getLogger("edge.mqtt.ingest")

BatchHandler = Callable[[list[tuple[str, bytes]], float], object]
_TICK_S = 0.25  # longest a blocked read delays stop() and keepalive checks
_ERR_TEXT_MAX = 200  # characters of an exception's text that go into a log line


def describe_error(e: BaseException, limit: int = _ERR_TEXT_MAX) -> str:
    """``Type: text`` of an exception, the text cut to ``limit`` characters; never raises.

    >>> describe_error(ValueError("x" * 500), limit=10)
    'ValueError: xxxxxxxxxx...'
    """
    try:
        text = str(e)
    except Exception:  # a __str__ that fails (deep recursion, a broken object) must not kill the thread
        text = "<unprintable>"
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


class _SessionEnd(Exception):
    """The connection ended (closed, refused, timed out); ``protocol`` when the broker misbehaved."""

    def __init__(self, why: str, *, protocol: bool = False, handoff: bool = False):
        super().__init__(why)
        self.protocol = protocol
        self.handoff = handoff


class FastSubscriber:
    """Receive the sensor subscriptions in batches on one thread; reconnects by itself."""

    def __init__(self, cfg: MqttConfig, *, client_id: str, subscriptions: list[tuple[str, int]],
                 on_batch: BatchHandler, chunk_size: int = 256 << 10, linger_s: float = 0.0005,
                 connect_timeout: float = 10.0, poison_after: int = 3):
        for filt, qos in subscriptions:
            if qos not in (0, 1):
                raise ValueError(f"subscription {filt!r}: qos {qos} is not supported (0 or 1)")
        self.cfg = cfg
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.on_batch = on_batch
        self.chunk_size = chunk_size
        self.linger_s = linger_s
        self.connect_timeout = connect_timeout
        if poison_after < 1:
            raise ValueError(f"poison_after must be >= 1, not {poison_after}")
        self.poison_after = poison_after
        self.connected = threading.Event()
        self.counters = {"connects": 0, "disconnects": 0, "messages": 0, "bytes": 0, "reads": 0,
                         "protocol_errors": 0, "sessions_resumed": 0, "sessions_lost": 0, "handoff_errors": 0,
                         "handoff_unacked": 0, "handoff_lost": 0, "poison_batches": 0,
                         "oversized": 0, "oversized_bytes": 0}
        # the longest packet held whole: the payload bound plus a PUBLISH's overhead; a longer
        # one is skipped as it streams in (never buffered), and MQTT 5 tells the broker so
        self.max_packet = wire.max_packet_size(cfg.max_payload_bytes)
        self._fail_streak = 0  # failed hand-offs since the last one that worked
        self._stop = threading.Event()
        self._topics: dict[bytes, str] = {}
        self._badlog = RateLimitedLog(log)
        self.thread = threading.Thread(target=self._run, name="mqtt-ingest", daemon=True)

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background; keeps retrying until the broker answers."""
        self.thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """True once connected and subscribed (within ``timeout`` seconds)."""
        return self.connected.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly and end the thread."""
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    # ---- the thread ------------------------------------------------------------------
    def _run(self) -> None:
        cfg = self.cfg
        delay: float | None = None
        while not self._stop.is_set():
            clean = self._session()
            if self._stop.is_set():
                break
            # a session that got subscribed and ended without a protocol error restarts the backoff
            delay = cfg.reconnect_min_s if (clean or delay is None) else min(delay * 2, cfg.reconnect_max_s)
            self._stop.wait(delay)

    def _session(self) -> bool:
        """One connection, start to end; True when it got subscribed and ended without a protocol error."""
        cfg = self.cfg
        sock = None
        try:
            sock = self._open()
            early = self._handshake(sock)
            self._read_loop(sock, early)
            return True
        except (_SessionEnd, OSError) as e:  # OSError covers resets, timeouts and TLS failures
            protocol = isinstance(e, _SessionEnd) and e.protocol
            if protocol:
                self.counters["protocol_errors"] += 1
                log.warning("dropping the ingest connection to %s:%d: %s", cfg.host, cfg.port, e)
            elif isinstance(e, _SessionEnd) and e.handoff:
                return False  # logged where it failed; back off as after a fault
            elif self.connected.is_set():
                log.warning("ingest connection to %s:%d lost (%s); reconnecting with backoff", cfg.host, cfg.port, e)
            else:
                self._badlog.warn("connect", "ingest cannot connect to %s:%d (%s); retrying with backoff",
                                  cfg.host, cfg.port, e)
            return not protocol and self.connected.is_set()
        except Exception:  # never let the ingest thread die
            log.exception("unexpected error on the ingest connection; reconnecting")
            return False
        finally:
            if self.connected.is_set():
                self.connected.clear()
                self.counters["disconnects"] += 1
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass

    def _open(self) -> socket.socket:
        cfg = self.cfg
        ctx = self._tls_context() if cfg.tls else None
        try:
            sock = socket.create_connection((cfg.host, cfg.port), timeout=self.connect_timeout)
        except OSError as e:
            raise _SessionEnd(f"cannot connect: {e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx is not None:
            try:
                sock = ctx.wrap_socket(sock, server_hostname=cfg.host)
            except OSError as e:  # ssl.SSLError is an OSError
                sock.close()
                raise _SessionEnd(f"TLS handshake failed: {e}") from None
        return sock

    def _tls_context(self) -> ssl.SSLContext:
        """What MqttLink asks of paho: verify the server against ca_file (else the system's
        CAs) and its host name; present cert_file/key_file when given (mutual TLS)."""
        cfg = self.cfg
        ctx = ssl.create_default_context(cafile=str(Path(cfg.ca_file).expanduser()) if cfg.ca_file else None)
        if cfg.cert_file:
            ctx.load_cert_chain(str(Path(cfg.cert_file).expanduser()),
                                str(Path(cfg.key_file).expanduser()) if cfg.key_file else None)
        return ctx

    def _handshake(self, sock: socket.socket) -> bytes:
        """CONNECT, await CONNACK, send SUBSCRIBE; return whatever arrived after the CONNACK."""
        cfg = self.cfg
        expiry = cfg.session_expiry_s
        sock.sendall(wire.encode_connect(self.client_id, protocol=cfg.protocol, keepalive=cfg.keepalive_s,
                                         username=cfg.username, password=cfg.password, clean=expiry == 0,
                                         session_expiry_s=expiry if cfg.protocol == "5" else 0,
                                         maximum_packet_size=self.max_packet if cfg.protocol == "5" else 0))
        buf = b""
        deadline = time.monotonic() + self.connect_timeout
        while True:
            try:
                span = wire.packet_span(buf)
            except wire.ProtocolError as e:
                raise _SessionEnd(str(e), protocol=True) from None
            if span is not None:
                break
            if time.monotonic() > deadline:
                raise _SessionEnd("no CONNACK in time")
            try:
                data = sock.recv(4096)
            except socket.timeout:
                continue
            if not data:
                raise _SessionEnd("closed before CONNACK")
            buf += data
        first, body, end = span
        if first != wire.CONNACK << 4:
            raise _SessionEnd(f"expected CONNACK, got packet type {first >> 4}", protocol=True)
        try:
            present, code = wire.parse_connack(buf[body:end], cfg.protocol)
        except wire.ProtocolError as e:
            raise _SessionEnd(str(e), protocol=True) from None
        if code:
            log.warning("broker %s:%d refused the ingest connection (reason code %#x)", cfg.host, cfg.port, code)
            raise _SessionEnd(f"CONNACK reason {code:#x}")
        self.counters["connects"] += 1
        if present:  # the broker kept our session: queued QoS 1 messages follow; subscribing again is harmless
            self.counters["sessions_resumed"] += 1
            log.info("ingest resumed its session on %s:%d", cfg.host, cfg.port)
        elif expiry and self.counters["connects"] > 1:
            self.counters["sessions_lost"] += 1
            log.warning("broker %s:%d no longer had the ingest session: QoS 1 messages queued for it are lost",
                        cfg.host, cfg.port)
        if self.subscriptions:
            sock.sendall(wire.encode_subscribe(1, self.subscriptions, protocol=cfg.protocol))
        else:
            self.connected.set()
        return buf[end:]

    def _check_suback(self, body: bytes) -> None:
        pid, codes = wire.parse_suback(body, self.cfg.protocol)
        if pid != 1 or len(codes) != len(self.subscriptions):
            raise wire.ProtocolError(f"SUBACK for packet {pid} with {len(codes)} codes; expected 1 with {len(self.subscriptions)}")
        for (filt, qos), code in zip(self.subscriptions, codes):
            if code >= 0x80:
                log.warning("broker refused the subscription %r (code %#x)", filt, code)
            elif code < qos:
                log.info("broker granted QoS %d for %r (asked %d)", code, filt, qos)
        log.info("ingest connected to %s:%d (MQTT %s); subscribed to %s", self.cfg.host, self.cfg.port,
                 self.cfg.protocol, ", ".join(f for f, _ in self.subscriptions))
        self.connected.set()

    def _deliver(self, msgs: list[tuple[str, bytes]], n_acks: int, received: float) -> bool:
        """Hand a read's messages on; True when their PUBACKs may go out (see the module's policy)."""
        counters = self.counters
        counters["messages"] += len(msgs)
        try:
            self.on_batch(msgs, received)
        except Exception as e:
            counters["handoff_errors"] += 1
            self._fail_streak += 1
            why = describe_error(e)
            if self._fail_streak >= self.poison_after:
                self._fail_streak = 0
                counters["poison_batches"] += 1
                counters["handoff_lost"] += len(msgs)
                self._badlog.warn("poison", "on_batch failed %d times in a row (%s); acknowledging the last "
                                  "batch and counting its %d messages as lost", self.poison_after, why, len(msgs))
                return True
            counters["handoff_lost"] += len(msgs) - n_acks  # QoS 0: the broker will not send them again
            counters["handoff_unacked"] += n_acks
            self._badlog.warn("on_batch", "on_batch failed (%s); %d QoS 1 messages left for redelivery, "
                              "%d QoS 0 lost; reconnecting", why, n_acks, len(msgs) - n_acks)
            return False
        self._fail_streak = 0
        return True

    def _skipped(self, sock: socket.socket, skip: wire.PacketSkip) -> None:
        """An over-long PUBLISH was read past: count it, log it (rate-limited) and acknowledge
        it if QoS 1 (it would be refused again at every redelivery); anything else over the
        limit is a protocol error."""
        try:
            topic, qos, pid = skip.publish_head()
        except wire.ProtocolError as e:
            raise _SessionEnd(str(e), protocol=True) from None
        self.counters["oversized"] += 1
        self.counters["oversized_bytes"] += skip.total
        self._badlog.warn("oversized", "skipped a %d-byte message on %r: over the maximum packet size %d "
                          "([mqtt] max_payload_bytes = %d)", skip.total, topic, self.max_packet, self.cfg.max_payload_bytes)
        if qos:
            sock.sendall(wire.encode_pubacks([pid]))

    def _read_loop(self, sock: socket.socket, early: bytes) -> None:
        cfg = self.cfg
        protocol, topics, counters = cfg.protocol, self._topics, self.counters
        chunk, stop = self.chunk_size, self._stop
        linger, short = self.linger_s, self.chunk_size // 4
        parse = wire.parse_stream
        keepalive = float(cfg.keepalive_s)
        is_tls = isinstance(sock, ssl.SSLSocket)
        sock.settimeout(_TICK_S)
        parts: list[bytes] = [early] if early else []  # an incomplete packet, possibly over many reads
        have, need = len(early), 0
        skip: wire.PacketSkip | None = None  # an over-long packet being discarded as it arrives
        last_out = time.monotonic()
        ping_at = 0.0
        while True:
            if stop.is_set():
                try:
                    sock.sendall(wire.DISCONNECT_PACKET)
                except OSError:
                    pass
                return
            try:
                data = sock.recv(chunk)
                if is_tls:
                    while sock.pending() and len(data) < chunk:
                        data += sock.recv(chunk)
            except socket.timeout:
                data = None
            mono = time.monotonic()
            if keepalive:
                if ping_at and mono - ping_at > keepalive:
                    raise _SessionEnd(f"no PINGRESP within {keepalive:g} s")
                if not ping_at and mono - last_out >= keepalive * 0.5:
                    sock.sendall(wire.PINGREQ_PACKET)
                    last_out = ping_at = mono
            if data is None:
                continue
            if not data:
                raise _SessionEnd("the broker closed the connection")
            received = time.time()
            counters["bytes"] += len(data)
            counters["reads"] += 1
            if skip is not None:
                data = skip.feed(data)
                if not skip.done:
                    continue
                self._skipped(sock, skip)
                skip = None
                if not data:
                    continue
            if parts:
                parts.append(data)
                have += len(data)
                if have < need:
                    continue
                data = b"".join(parts)
                parts = []
            try:
                msgs, used, acks, controls = parse(data, protocol, topics=topics)
            except wire.ProtocolError as e:
                # the good ones before the fault still count, and are acknowledged once handed on
                if e.messages and self._deliver(e.messages, len(e.acks), received) and e.acks:
                    try:
                        sock.sendall(wire.encode_pubacks(e.acks))
                    except OSError:
                        pass
                raise _SessionEnd(str(e), protocol=True) from None
            if used < len(data):
                rest = data[used:]
                parts = [rest]
                have = len(rest)
                need = wire.packet_length(rest) or 0
                if need > self.max_packet:  # never held whole: keep its head, drop the rest as it comes
                    skip, parts, have, need = wire.PacketSkip(need), [], 0, 0
                    skip.feed(rest)
            if msgs and not self._deliver(msgs, len(acks), received):
                raise _SessionEnd("on_batch failed", handoff=True)
            if acks:  # after on_batch took the messages: one write for the whole read
                sock.sendall(wire.encode_pubacks(acks))
                last_out = mono
            for kind, body in controls:
                if kind == wire.PINGRESP:
                    ping_at = 0.0
                elif kind == wire.SUBACK:
                    try:
                        self._check_suback(body)
                    except wire.ProtocolError as e:
                        raise _SessionEnd(str(e), protocol=True) from None
                elif kind == wire.DISCONNECT:
                    raise _SessionEnd(f"the broker disconnected us (reason {wire.parse_disconnect(body, protocol):#x})")
                else:
                    raise _SessionEnd(f"unexpected packet type {kind} after CONNACK", protocol=True)
            if linger and len(data) < short:
                # Keeping up: each read would take a few messages and cost a wakeup and a GIL
                # hand-over (~10 us) for them; wait a moment so the next read takes many.
                time.sleep(linger)
