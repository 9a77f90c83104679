"""Test helpers: a real MQTT client that publishes samples and collects what comes back."""
from __future__ import annotations

import contextlib
import os
import threading
import time

import orjson
import paho.mqtt.client as mqtt


class Client:
    """A paho client on the test broker that records every message on its subscriptions."""

    def __init__(self, broker, *subscriptions: str, protocol: str = "5"):
        self.msgs: list[tuple[str, bytes, bool]] = []
        self.cond = threading.Condition()
        proto = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=proto)
        self.subs = subscriptions
        self.subacks = 0  # SUBACKs received: the subscriptions are in place once there is one per topic
        self.c.on_connect = lambda c, *a: [c.subscribe(s, qos=1) for s in self.subs]
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.reconnect_delay_set(0.1, 0.5)
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        # a message published before the broker has the subscription is not delivered (nothing
        # here is retained): return only once every subscription is acknowledged
        with self.cond:
            if not self.cond.wait_for(lambda: self.subacks >= len(self.subs), 30 * slowdown()):
                raise AssertionError(f"the broker did not acknowledge the subscriptions {self.subs}")

    def _on_subscribe(self, c, u, mid, reason_codes, properties=None):
        with self.cond:
            self.subacks += 1
            self.cond.notify_all()

    def _on_message(self, c, u, m):
        with self.cond:
            self.msgs.append((m.topic, m.payload, bool(m.retain)))
            self.cond.notify_all()

    def wait_for(self, pred, timeout: float = 10.0):
        """Wait until ``pred(msgs)`` is truthy; return its value (fails the test on timeout)."""
        deadline = time.monotonic() + timeout * slowdown()
        with self.cond:
            while True:
                v = pred(self.msgs)
                if v:
                    return v
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out; got {len(self.msgs)} messages: {[m[0] for m in self.msgs[-10:]]}")
                self.cond.wait(left)

    def json_on(self, prefix: str) -> list[dict]:
        with self.cond:
            return [orjson.loads(p) for t, p, _ in self.msgs if t.startswith(prefix)]

    def publish(self, topic: str, payload, qos: int = 1):
        if not isinstance(payload, (bytes, str)):
            payload = orjson.dumps(payload)
        self.c.publish(topic, payload, qos=qos).wait_for_publish(5)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def batch(t0: float, n: int, *, value=lambda i: [0.01 * i, 0.0, 1.0], dt: float = 0.001) -> dict:
    return {"t0": t0, "dt": dt, "v": [value(i) for i in range(n)]}


def slowdown() -> float:
    """How many times slower than the host this run is (EDGE_TEST_SLOWDOWN, set by
    scripts/check-avx2.sh for qemu's TCG; 1 otherwise): bounds on waiting are scaled by it."""
    value = os.environ.get("EDGE_TEST_SLOWDOWN", "1")
    try:
        factor = float(value)
    except ValueError:
        raise ValueError(f"EDGE_TEST_SLOWDOWN={value!r} is not a number; give a factor >= 1 or unset it") from None
    if not factor >= 1:
        raise ValueError(f"EDGE_TEST_SLOWDOWN={value!r} must be >= 1 (a slowdown factor); unset it for the host")
    return factor


def poll(pred, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``pred`` until truthy; return its value, or fail the test after ``timeout``
    seconds (a bound on waiting for an event, not a speed assertion), times ``slowdown()``."""
    deadline = time.monotonic() + timeout * slowdown()
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


PG = "postgresql://postgres@127.0.0.1:5432/test"


def fresh_pg_schema(prefix: str):
    """A generator for a pytest fixture: a schema name no other test uses (skipped when no
    PostgreSQL is reachable), and afterwards every schema starting with it dropped (a fleet
    server's lanes make ``<schema>_lane_<lane>`` beside it)."""
    import uuid

    import pytest
    psycopg = pytest.importorskip("psycopg")
    try:
        psycopg.connect(PG, connect_timeout=3).close()
    except psycopg.Error:
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432 (.ci/run starts one)")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(PG, autocommit=True) as c:
        for (s,) in c.execute("SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE %s",
                              (name + "%",)).fetchall():
            c.execute(f'DROP SCHEMA IF EXISTS "{s}" CASCADE')


@contextlib.contextmanager
def tmpfs(where, size: int):
    """A tmpfs of ``size`` bytes mounted at ``where`` (a real full disk for the tests), unmounted
    lazily at the end so a busy file cannot leave it behind; skipped where mounting is not allowed."""
    import subprocess
    from pathlib import Path

    import pytest
    where = Path(where)
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {r.stderr.strip()[:200]}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill_disk(path) -> int:
    """Write ``path`` until its filesystem says ENOSPC (and nothing else); the bytes written."""
    import errno
    n = 0
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                n += f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                return n
