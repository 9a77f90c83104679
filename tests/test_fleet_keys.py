"""`edge keys`: permissions, listing, export, no overwrite, loading."""
from __future__ import annotations

import stat

import pytest

from edge.cli import main
from edge.fleet.keys import KeyFileError, create_key, export_public, list_keys, load_private, load_public, load_trusted


def _mode(p):
    return stat.S_IMODE(p.stat().st_mode)


def test_created_keys_are_private_files_in_a_private_folder(tmp_path):
    d = tmp_path / "keys"
    info = create_key(d, "press-7", role="device")
    assert _mode(d) == 0o700 and _mode(info.private_path) == 0o600 and _mode(info.public_path) == 0o600
    assert load_private(info.private_path).public_key() == load_public(info.public_path)


def test_an_existing_key_is_never_overwritten(tmp_path):
    create_key(tmp_path, "n1")
    with pytest.raises(KeyFileError):
        create_key(tmp_path, "n1")


def test_list_and_export_through_the_cli(tmp_path, capsys):
    d, trust = tmp_path / "k", tmp_path / "devices"
    assert main(["keys", "create", "srv", "--role", "server", "--dir", str(d)]) == 0
    assert main(["keys", "create", "n.1", "--dir", str(d)]) == 0
    assert main(["keys", "list", "--dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert "n.1\tdevice" in out and "srv\tserver" in out
    assert main(["keys", "export", "n.1", "--dir", str(d), "--to", str(trust)]) == 0
    assert set(load_trusted(trust)) == {"n.1"} and _mode(trust / "n.1.pub") == 0o600
    assert export_public(d, "srv", role="server").startswith(b"-----BEGIN PUBLIC KEY-----")
    assert [k.name for k in list_keys(d)] == ["n.1", "srv"]


def test_a_bad_key_file_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.key"
    p.write_bytes(b"not a key")
    with pytest.raises(KeyFileError, match="cannot read the private key"):
        load_private(p)
    assert main(["keys", "create", "bad/name", "--dir", str(tmp_path)]) == 2
