"""A TCP proxy in front of a real broker that a test can cut and restore: the client's
connection drops (both sides close, so the broker sees it too) while the broker keeps
running, and keeps its sessions."""
from __future__ import annotations

import socket
import threading


class CuttableProxy:
    """Listens on 127.0.0.1:<port>; forwards to ``(host, port)`` while up, refuses while down."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.srv.settimeout(0.1)
        self.port = self.srv.getsockname()[1]
        self.accepted = 0
        self._up = True
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                continue
            if not self._up:
                conn.close()
                continue
            try:
                up = socket.create_connection(self.target, timeout=5)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self.accepted += 1
                self._socks += [conn, up]
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while self._flowing.wait() and (data := src.recv(65536)):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def down(self) -> None:
        """Drop every forwarded connection and refuse new ones."""
        self._up = False
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def up(self) -> None:
        self._up = True

    def pause(self) -> None:
        """Keep the connections open but stop forwarding (a broker or link that does not keep up):
        the sender's socket buffers fill. A pump already inside recv forwards that one read."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._flowing.set()
        self.down()
        self._closed = True
        self.srv.close()
