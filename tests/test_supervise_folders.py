"""Private folders come from one helper (``edge.state.private_dir``: every missing parent
0700, not only the last), and the status socket is 0600 without touching the process
umask, which other threads' new folders and files depend on."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def _chain(base: Path) -> list[Path]:
    return [base / "a", base / "a" / "b", base / "a" / "b" / "c"]


def test_the_status_socket_is_private_without_changing_the_umask(tmp_path, monkeypatch):
    from edge.control import StatusSocket, read_status

    def no_umask(mask):  # another thread creating a folder now would get this mask
        raise AssertionError(f"os.umask({mask:o}) called while other threads run")

    base = tmp_path / "run"
    sock_path = _chain(base)[-1] / "edge.sock"
    monkeypatch.setattr(os, "umask", no_umask)
    sock = StatusSocket(sock_path, lambda: {"ok": 1})
    monkeypatch.undo()
    sock.start()
    try:
        assert stat.S_ISSOCK(os.stat(sock_path).st_mode) and _mode(sock_path) == 0o600
        assert all(_mode(d) == 0o700 for d in _chain(base)), [oct(_mode(d)) for d in _chain(base)]
        assert read_status(sock_path) == {"ok": 1}
        assert sorted(p.name for p in sock_path.parent.iterdir()) == ["edge.sock"]  # no temporary folder left
    finally:
        sock.stop()


def test_the_fleet_keys_folder_and_every_missing_parent_are_private(tmp_path):
    from edge.fleet.keys import create_key

    create_key(_chain(tmp_path)[-1], "dev1")

    assert [_mode(d) for d in _chain(tmp_path)] == [0o700] * 3


def test_the_label_keys_folder_and_every_missing_parent_are_private(tmp_path):
    from edge.ingest.labelauth import create_label_key

    key = create_label_key(_chain(tmp_path)[-1], "lab1")

    assert [_mode(d) for d in _chain(tmp_path)] == [0o700] * 3 and _mode(key) == 0o600


def test_a_new_fleet_store_folder_is_private_and_a_given_one_keeps_its_mode(tmp_path):
    from edge.fleet.store import SQLiteStore

    SQLiteStore(_chain(tmp_path)[-1] / "fleet.db").close()
    given = tmp_path / "given"
    given.mkdir(mode=0o755)
    os.chmod(given, 0o755)
    SQLiteStore(given / "fleet.db").close()

    assert [_mode(d) for d in _chain(tmp_path)] == [0o700] * 3 and _mode(given) == 0o755
