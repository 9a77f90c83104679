"""MQTT 3.1.1 / 5 packets <-> bytes for a subscriber. Pure: bytes in, values out.

Only what a receive-mostly client needs: CONNECT, SUBSCRIBE, PUBACK, PINGREQ and
DISCONNECT are encoded; CONNACK, SUBACK and PUBLISH are decoded (PUBLISH is also encoded,
for the tests and the benchmark's load generator). ``parse_publishes`` is the hot path:
it walks a buffer of back-to-back PUBLISH packets in one tight loop and yields plain
``(topic, payload)`` tuples, decoding each distinct topic once. A malformed packet raises
``ProtocolError``; nothing else escapes any decoder here.

Topic aliases (MQTT 5) are not supported: CONNECT never advertises a Topic Alias
Maximum, so a conforming broker never sends one, and a PUBLISH that uses one anyway is
a ``ProtocolError``. MQTT 5 properties of a PUBLISH are skipped whole. A redelivered
PUBLISH (DUP flag set, after a reconnect to a persistent session) decodes and is
acknowledged like any other: QoS 1 is at-least-once, so a consumer can see a message
twice, and packet ids are reused, so they cannot tell a duplicate apart.

>>> pkt = encode_publish("s/m1/accel", b'{"v": [1]}', qos=1, packet_id=7, protocol="5")
>>> parse_publishes(pkt + pkt[:5], "5")
([('s/m1/accel', b'{"v": [1]}')], 27, [7])
"""
from __future__ import annotations

from edge.errors import BrokerError

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14
PROTOCOLS = ("3.1.1", "5")
MAX_REMAINING = 268_435_455  # the largest remaining length four varint bytes can say
PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"
_TOPIC_CACHE_MAX = 100_000
# fixed header (5) + topic length and the longest topic (2 + 65535) + packet id (2) + properties
_PUBLISH_OVERHEAD = 5 + 2 + 0xFFFF + 2 + 1024
_HEAD_KEEP = 5 + 2 + 0xFFFF + 2  # what a skipped PUBLISH keeps: enough for its topic and packet id


class ProtocolError(BrokerError):
    """The broker sent bytes that are not a valid MQTT packet (the connection must be dropped).

    ``messages`` holds the valid messages decoded before the fault, in order, so that a
    caller can still deliver them, and ``acks`` the packet ids of the QoS 1 ones among
    them, so that it can acknowledge them once delivered.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.messages: list[tuple[str, bytes]] = []
        self.acks: list[int] = []


# ---- encoding -------------------------------------------------------------------------
def encode_varint(n: int) -> bytes:
    """MQTT's variable byte integer.

    >>> encode_varint(127), encode_varint(128), encode_varint(16_383)
    (b'\\x7f', b'\\x80\\x01', b'\\xff\\x7f')
    """
    if not 0 <= n <= MAX_REMAINING:
        raise ValueError(f"{n} does not fit an MQTT variable byte integer")
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    if len(b) > 0xFFFF:
        raise ValueError(f"string of {len(b)} bytes is longer than MQTT allows (65535)")
    return len(b).to_bytes(2, "big") + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_varint(len(body)) + body


def _check_protocol(protocol: str) -> bool:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    return protocol == "5"


def max_packet_size(max_payload_bytes: int) -> int:
    """The largest PUBLISH a subscriber must take to get payloads of ``max_payload_bytes``:
    the payload plus the longest topic MQTT allows, the packet id, the fixed header and
    room for properties. Both connections advertise it (MQTT 5 Maximum Packet Size), and
    the raw reader skips a longer packet without holding it (``PacketSkip``).

    >>> max_packet_size(1 << 20)
    1115144
    >>> max_packet_size(256 << 20) == MAX_REMAINING + 5
    True
    """
    return min(MAX_REMAINING + 5, int(max_payload_bytes) + _PUBLISH_OVERHEAD)


def encode_connect(client_id: str, *, protocol: str, keepalive: int, username: str = "",
                   password: str = "", clean: bool = True, session_expiry_s: int = 0,
                   maximum_packet_size: int = 0) -> bytes:
    """CONNECT; ``clean`` is Clean Start (5) / Clean Session (3.1.1).

    MQTT 5 carries a Session Expiry Interval property when ``session_expiry_s`` > 0 (how
    long the broker keeps the session, and the QoS 1 messages queued in it, after the
    connection ends), a Maximum Packet Size when ``maximum_packet_size`` > 0 (the broker
    then never sends a longer packet: it drops that message for us), and nothing else: no
    Topic Alias Maximum, so no topic aliases. In 3.1.1 a session that is not clean lasts
    until the broker drops it, and there is no way to say a maximum packet size.

    >>> encode_connect("c", protocol="5", keepalive=30, clean=False, session_expiry_s=3600)[9:]
    b'\\x00\\x00\\x1e\\x05\\x11\\x00\\x00\\x0e\\x10\\x00\\x01c'
    >>> encode_connect("c", protocol="5", keepalive=30, maximum_packet_size=1 << 20)[12:18]
    b"\\x05'\\x00\\x10\\x00\\x00"
    """
    v5 = _check_protocol(protocol)
    if not 0 <= session_expiry_s <= 0xFFFFFFFF:
        raise ValueError(f"session expiry {session_expiry_s} s does not fit 4 bytes")
    if not 0 <= maximum_packet_size <= 0xFFFFFFFF:
        raise ValueError(f"maximum packet size {maximum_packet_size} does not fit 4 bytes")
    flags = (0x02 if clean else 0) | (0x80 if username else 0) | (0x40 if username and password else 0)
    body = _str(b"MQTT") + bytes((5 if v5 else 4, flags)) + keepalive.to_bytes(2, "big")
    if v5:
        props = b"\x11" + session_expiry_s.to_bytes(4, "big") if session_expiry_s else b""
        if maximum_packet_size:
            props += b"\x27" + maximum_packet_size.to_bytes(4, "big")
        body += encode_varint(len(props)) + props
    body += _str(client_id)
    if username:
        body += _str(username)
        if password:
            body += _str(password)
    return _packet(CONNECT << 4, body)


def encode_subscribe(packet_id: int, subscriptions: list[tuple[str, int]], *, protocol: str) -> bytes:
    """SUBSCRIBE to ``[(filter, max_qos)]``; the options byte is the plain QoS in both versions."""
    v5 = _check_protocol(protocol)
    body = packet_id.to_bytes(2, "big") + (b"\x00" if v5 else b"")
    for filt, qos in subscriptions:
        body += _str(filt) + bytes((qos & 0x03,))
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def encode_publish(topic: str | bytes, payload: bytes, *, qos: int = 0, packet_id: int = 0, protocol: str = "3.1.1",
                   retain: bool = False, dup: bool = False, properties: bytes = b"") -> bytes:
    """One PUBLISH; ``properties`` is a raw MQTT 5 property block (without its length).

    >>> encode_publish(b"a/b", b"hi")
    b'0\\x07\\x00\\x03a/bhi'
    """
    v5 = _check_protocol(protocol)
    if qos not in (0, 1, 2):
        raise ValueError(f"qos {qos} is not 0, 1 or 2")
    body = _str(topic)
    if qos:
        body += packet_id.to_bytes(2, "big")
    if v5:
        body += encode_varint(len(properties)) + properties
    elif properties:
        raise ValueError("properties exist only in MQTT 5")
    return _packet((PUBLISH << 4) | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0), body + payload)


def encode_pubacks(packet_ids: list[int]) -> bytes:
    """PUBACKs (success) for several packet ids, back to back; the same bytes in 3.1.1 and 5."""
    return b"".join(b"\x40\x02" + i.to_bytes(2, "big") for i in packet_ids)


def encode_connack(reason: int = 0, *, protocol: str, session_present: bool = False) -> bytes:
    """CONNACK (what a broker sends; for tests)."""
    v5 = _check_protocol(protocol)
    return _packet(CONNACK << 4, bytes((1 if session_present else 0, reason)) + (b"\x00" if v5 else b""))


def encode_suback(packet_id: int, codes: list[int], *, protocol: str) -> bytes:
    """SUBACK (what a broker sends; for tests)."""
    v5 = _check_protocol(protocol)
    return _packet(SUBACK << 4, packet_id.to_bytes(2, "big") + (b"\x00" if v5 else b"") + bytes(codes))


# ---- decoding -------------------------------------------------------------------------
def _varint_at(buf: bytes, pos: int, end: int) -> tuple[int, int] | None:
    """(value, position after it), or None when ``buf[pos:end]`` ends inside it."""
    value, shift = 0, 0
    for k in range(4):
        if pos + k >= end:
            return None
        b = buf[pos + k]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos + k + 1
        shift += 7
    raise ProtocolError("variable byte integer longer than 4 bytes")


def packet_span(buf: bytes, pos: int = 0) -> tuple[int, int, int] | None:
    """``(first_byte, body_start, end)`` of the packet at ``pos``, or None while it is incomplete.

    >>> packet_span(b"\\xd0\\x00rest")
    (208, 2, 2)
    """
    n = len(buf)
    if pos >= n:
        return None
    r = _varint_at(buf, pos + 1, n)
    if r is None:
        return None
    length, body = r
    end = body + length
    return (buf[pos], body, end) if end <= n else None


def packet_length(buf: bytes, pos: int = 0) -> int | None:
    """Total length of the packet at ``pos`` once its fixed header is complete, else None."""
    r = _varint_at(buf, pos + 1, len(buf)) if pos < len(buf) else None
    return None if r is None else r[1] - pos + r[0]


class PacketSkip:
    """An over-long packet discarded as it arrives: it keeps only its first bytes (enough
    for a PUBLISH's topic and packet id), so memory stays bounded whatever length it says.

    >>> pkt = encode_publish("s/big", b"x" * 100, qos=1, packet_id=9)
    >>> skip = PacketSkip(len(pkt))
    >>> skip.feed(pkt[:40]), skip.done
    (b'', False)
    >>> skip.feed(pkt[40:] + b"next"), skip.done
    (b'next', True)
    >>> skip.publish_head()
    ('s/big', 1, 9)
    """

    def __init__(self, total: int):
        self.total = int(total)  # the whole packet, fixed header included
        self.seen = 0
        self._head = bytearray()

    @property
    def done(self) -> bool:
        return self.seen >= self.total

    def feed(self, data: bytes) -> bytes:
        """Take this packet's part of ``data``; return what follows the packet."""
        take = min(len(data), self.total - self.seen)
        if len(self._head) < _HEAD_KEEP:
            self._head += data[: min(take, _HEAD_KEEP - len(self._head))]
        self.seen += take
        return data[take:]

    def publish_head(self) -> tuple[str, int, int]:
        """``(topic, qos, packet_id)`` of the skipped PUBLISH (topic bounded, undecodable bytes
        replaced; packet id 0 for QoS 0); ``ProtocolError`` when it is not a valid PUBLISH."""
        h = bytes(self._head)
        if not h or h[0] >> 4 != PUBLISH:
            raise ProtocolError(f"packet of {self.total} bytes (type {h[0] >> 4 if h else '?'}) is over the maximum packet size")
        r = _varint_at(h, 1, len(h))
        p = r[1] if r else len(h)
        if p + 2 > len(h):
            raise ProtocolError("over-long PUBLISH without a topic")
        tl = h[p] << 8 | h[p + 1]
        qos = (h[0] >> 1) & 3
        if qos > 1 or p + 2 + tl + (2 if qos else 0) > len(h):
            raise ProtocolError(f"over-long PUBLISH with QoS {qos} and a topic length of {tl}")
        topic = h[p + 2: p + 2 + tl].decode("utf-8", "replace")[:200]
        pid = int.from_bytes(h[p + 2 + tl: p + 4 + tl], "big") if qos else 0
        return topic, qos, pid


def _topic(tb: bytes, cache: dict[bytes, str]) -> str:
    try:
        topic = tb.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"topic {tb[:60]!r} is not UTF-8") from None
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise ProtocolError(f"topic {topic[:60]!r} has a wildcard or NUL in a PUBLISH")
    if len(cache) >= _TOPIC_CACHE_MAX:
        cache.clear()
    cache[tb] = topic
    return topic


def parse_publishes(buf: bytes | bytearray, protocol: str, *, start: int = 0,
                    topics: dict[bytes, str] | None = None) -> tuple[list[tuple[str, bytes]], int, list[int]]:
    """Decode the run of complete PUBLISH packets at ``buf[start:]``.

    Returns ``(messages, consumed, puback_ids)``: ``[(topic, payload)]`` in order, the
    bytes used from ``start`` (it stops before an incomplete packet or any packet that is
    not a PUBLISH, so ``packet_span`` can take that one), and the packet ids of the QoS 1
    messages to acknowledge. ``topics`` caches decoded topics by their bytes across calls.
    Raises ``ProtocolError`` (only) for a malformed PUBLISH: a bad length, QoS 2 or 3,
    packet id 0, a non-UTF-8 or empty topic (a topic alias), a property block that
    overruns the packet; its ``messages`` are those decoded before the fault.
    """
    if type(buf) is not bytes:
        buf = bytes(buf)
    v5 = _check_protocol(protocol)
    cache = topics if topics is not None else {}
    get = cache.get
    n = len(buf)
    pos = start
    out: list[tuple[str, bytes]] = []
    append = out.append
    acks: list[int] = []
    try:
        while pos + 1 < n:
            h = buf[pos]
            if h & 0xF0 != 0x30:
                break
            b = buf[pos + 1]
            if b < 0x80:
                p, end = pos + 2, pos + 2 + b
            else:
                r = _varint_at(buf, pos + 1, n)
                if r is None:
                    break
                end = r[1] + r[0]
                p = r[1]
            if end > n:
                break
            tl = (buf[p] << 8 | buf[p + 1]) if p + 1 < end else -1
            p += 2
            q = p + tl
            qos = h & 0x06
            if tl <= 0 or q + (2 if qos else 0) > end:
                raise ProtocolError(f"PUBLISH of {end - pos} bytes has a topic length of {tl}")
            tb = buf[p:q]
            topic = get(tb)
            if topic is None:
                topic = _topic(tb, cache)
            if qos:
                if qos != 0x02:
                    raise ProtocolError(f"PUBLISH with QoS {qos >> 1} (subscriptions are at most QoS 1)")
                pid = buf[q] << 8 | buf[q + 1]
                if not pid:
                    raise ProtocolError("QoS 1 PUBLISH with packet id 0")
                acks.append(pid)
                q += 2
            if v5:
                b = buf[q] if q < end else 0x80
                if b < 0x80:
                    q += 1 + b
                else:
                    r = _varint_at(buf, q, end)
                    if r is None:
                        raise ProtocolError("PUBLISH property length overruns the packet")
                    q = r[1] + r[0]
                if q > end:
                    raise ProtocolError("PUBLISH properties overrun the packet")
            append((topic, buf[q:end]))
            pos = end
    except ProtocolError as e:
        e.messages, e.acks = out, acks
        raise
    return out, pos - start, acks


def parse_connack(body: bytes, protocol: str) -> tuple[bool, int]:
    """``(session_present, reason_code)`` of a CONNACK body (0 means accepted)."""
    if len(body) < 2 or body[0] & 0xFE:
        raise ProtocolError(f"malformed CONNACK {bytes(body[:8])!r}")
    if protocol == "5" and (len(body) < 3 or _varint_at(body, 2, len(body)) is None):
        raise ProtocolError("MQTT 5 CONNACK without a complete property block")
    return bool(body[0] & 1), body[1]


def parse_suback(body: bytes, protocol: str) -> tuple[int, list[int]]:
    """``(packet_id, return_codes)`` of a SUBACK body; a code >= 0x80 means refused."""
    if len(body) < 3:
        raise ProtocolError(f"malformed SUBACK {bytes(body)!r}")
    pid, p = int.from_bytes(body[:2], "big"), 2
    if protocol == "5":
        r = _varint_at(body, 2, len(body))
        if r is None or r[1] + r[0] > len(body):
            raise ProtocolError("SUBACK properties overrun the packet")
        p = r[1] + r[0]
    codes = list(body[p:])
    if not codes:
        raise ProtocolError("SUBACK without return codes")
    return pid, codes


def parse_disconnect(body: bytes, protocol: str) -> int:
    """The reason code of a server DISCONNECT (MQTT 5; 0 when absent)."""
    return body[0] if protocol == "5" and body else 0


def parse_stream(buf: bytes, protocol: str, *, topics: dict[bytes, str] | None = None
                 ) -> tuple[list[tuple[str, bytes]], int, list[int], list[tuple[int, bytes]]]:
    """Everything complete in ``buf``: ``(messages, consumed, puback_ids, controls)``.

    ``controls`` are the other packets, in order, as ``(packet_type, body)``; PUBLISH
    packets between them are in ``messages``. Raises ``ProtocolError`` (only), whose
    ``messages`` are those decoded before the fault.

    >>> parse_stream(b"\\xd0\\x00" + encode_publish("t", b"x") + b"\\x30", "3.1.1")
    ([('t', b'x')], 8, [], [(13, b'')])
    """
    if type(buf) is not bytes:
        buf = bytes(buf)
    cache = topics if topics is not None else {}
    msgs: list[tuple[str, bytes]] = []
    acks: list[int] = []
    controls: list[tuple[int, bytes]] = []
    pos, n = 0, len(buf)
    try:
        while pos < n:
            m, used, a = parse_publishes(buf, protocol, start=pos, topics=cache)
            if m:
                msgs += m
                acks += a
                pos += used
                continue
            span = packet_span(buf, pos)
            if span is None:
                break
            first, body, end = span
            kind = first >> 4
            if kind == PUBLISH:  # a PUBLISH that parse_publishes would not take is malformed
                raise ProtocolError("malformed PUBLISH")
            if kind not in (CONNACK, SUBACK, PINGRESP, DISCONNECT) or (first & 0x0F):
                raise ProtocolError(f"unexpected packet type {kind} (flags {first & 0x0F:#x}) from the broker")
            controls.append((kind, buf[body:end]))
            pos = end
    except ProtocolError as e:
        e.messages, e.acks = msgs + e.messages, acks + e.acks
        raise
    return msgs, pos, acks, controls
