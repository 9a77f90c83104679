"""Start an MQTT broker on a free loopback port: mosquitto when on the PATH, else an
embedded pure-Python broker (amqtt) in a child process.

Used by ``edge demo`` (when no broker is given), by the tests (each starts its own, so
it can be killed and restarted without touching anyone else's) and by the benchmarks.
The child is always stopped: by ``stop()``, by the context manager, at interpreter exit,
and, for the embedded broker, by the child itself when its parent disappears.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edge.errors import BrokerError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class BrokerProcess:
    """A broker child process on ``host:port``; ``protocol`` is the best MQTT version it speaks."""

    def __init__(self, *, port: int = 0, kind: str = "auto", extra_conf: str = ""):
        if kind == "auto":
            kind = "mosquitto" if shutil.which("mosquitto") else "embedded"
        if kind == "mosquitto" and not shutil.which("mosquitto"):
            raise BrokerError("mosquitto is not on the PATH (apt-get install mosquitto)")
        self.kind = kind
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.protocol = "5" if kind == "mosquitto" else "3.1.1"
        self.extra_conf = extra_conf
        self._dir = Path(tempfile.mkdtemp(prefix="edge-broker-"))
        self.proc: subprocess.Popen | None = None
        atexit.register(self.stop)

    def start(self, timeout: float = 10.0) -> "BrokerProcess":
        if self.kind == "mosquitto":
            conf = self._dir / "mosquitto.conf"
            conf.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
                            f"max_queued_messages 100000\n{self.extra_conf}\n")
            cmd = ["mosquitto", "-c", str(conf)]
        else:
            cmd = [sys.executable, "-m", "edge.broker", str(self.port)]
        log = open(self._dir / "broker.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        if not wait_for_port(self.host, self.port, timeout):
            out = self.log_text()
            self.stop()
            raise BrokerError(f"{self.kind} broker did not start on {self.host}:{self.port}: {out[-500:]}")
        return self

    def log_text(self) -> str:
        p = self._dir / "broker.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def kill(self) -> None:
        """Kill the broker abruptly (SIGKILL), as a crash would."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def restart(self, timeout: float = 10.0) -> None:
        """Start again on the same port (after ``kill`` or ``stop``)."""
        self.stop()
        deadline = time.monotonic() + timeout
        while True:  # the port may linger briefly after a kill
            try:
                self.start(timeout=max(1.0, deadline - time.monotonic()))
                return
            except BrokerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def __enter__(self) -> "BrokerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


def _embedded_main(port: int) -> None:
    """Run amqtt on 127.0.0.1:port until SIGTERM or until the parent process goes away."""
    import asyncio
    import logging

    try:
        from amqtt.broker import Broker
    except ImportError:
        sys.exit("the embedded broker needs amqtt: pip install 'edge-runtime[embedded-broker]' (or install mosquitto)")
    logging.basicConfig(level=logging.WARNING)
    parent = os.getppid()

    async def main() -> None:
        broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                         "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}})
        await broker.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        while not stop.is_set() and os.getppid() == parent:
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        await broker.shutdown()

    asyncio.run(main())


if __name__ == "__main__":
    _embedded_main(int(sys.argv[1]))
