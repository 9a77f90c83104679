"""The daemon's local status socket: `edge status` reads the live state from it.

A Unix stream socket ``edge.sock`` in the node's runtime folder (``edge.state.runtime_dir``:
RAM, not the flash of the state folder) (mode 0600: only the daemon's user
and root can read it) on a thread named ``control``. Each connection gets the daemon's
``status()`` as one JSON document, then the socket closes. No request is parsed, so
there is nothing to attack but the connect itself.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from edge.state import private_dir

log = logging.getLogger("edge.control")


class StatusSocket:
    """Serve ``status()`` as JSON on a Unix socket until ``stop()``."""

    def __init__(self, path: Path, status: Callable[[], dict[str, Any]]):
        self.path = Path(path)
        private_dir(self.path.parent)
        if self.path.is_socket() or self.path.exists():
            self.path.unlink()  # a stale socket of a daemon that did not stop cleanly
        read = status

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                try:
                    body = json.dumps(read(), default=str).encode()
                except Exception as e:  # a failing reader answers with the error, the thread goes on
                    body = json.dumps({"error": f"status failed: {type(e).__name__}"}).encode()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

        self.server = _bind_private(self.path, Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="control", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        try:
            self.path.unlink()
        except OSError:
            pass


def _bind_private(path: Path, handler) -> socketserver.ThreadingUnixStreamServer:
    """A server listening on ``path``, a socket of mode 0600 from the start.

    Not by ``os.umask``: the umask is the process's, and other threads create folders and
    files meanwhile. The socket is bound in a fresh 0700 folder (``mkdtemp``), made 0600
    there, where no one else can reach it, and then renamed into place.
    """
    tmp = Path(tempfile.mkdtemp(prefix=".edge-sock-", dir=path.parent))
    server = socketserver.ThreadingUnixStreamServer(str(tmp / "s"), handler, bind_and_activate=False)
    try:
        server.server_bind()
        os.chmod(tmp / "s", 0o600)
        os.replace(tmp / "s", path)
        server.server_address = str(path)
        server.server_activate()
    except BaseException:
        server.server_close()
        raise
    finally:
        try:
            (tmp / "s").unlink()
        except OSError:
            pass
        tmp.rmdir()
    return server


def read_status(path: Path, timeout: float = 5.0) -> dict[str, Any]:
    """The live status from a daemon's socket; ``OSError`` when no daemon answers there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        chunks = []
        while True:
            b = s.recv(1 << 16)
            if not b:
                break
            chunks.append(b)
    return json.loads(b"".join(chunks))
