"""Ed25519 keys for fleet sync: create, list, export, load. Files 0600 in a 0700 folder.

A key is two files in the keys folder: ``<name>.<role>.key`` (the private key,
PKCS#8 PEM) and ``<name>.<role>.pub`` (the public key, SubjectPublicKeyInfo PEM);
``role`` is ``device``, ``server`` or ``release``. A device signs its deltas with its own key and
trusts the server's public key; the server signs global heads with its key and trusts
the device keys in its ``devices_dir`` (one ``<node>.pub`` per device, written by
``edge keys export NAME --to DIR``). A ``release`` key signs model release manifests
(``edge fleet-server release``, ``edge/fleet/RELEASE_FORMAT.md``) and nothing else: kept
apart from the aggregation (``server``) key, so that a stolen aggregation key cannot ship
a model to devices.

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> info = create_key(d, "press-7", role="device")
>>> [k.name for k in list_keys(d)], oct(Path(d).stat().st_mode & 0o777)
(['press-7'], '0o700')
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.errors import ConfigError, EdgeError

ROLES = ("device", "server", "release")
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*$")


class KeyFileError(EdgeError):
    """A key file is missing, unreadable or not an Ed25519 key."""

    exit_code = 9


@dataclass(frozen=True)
class KeyInfo:
    name: str
    role: str
    key_id: str
    private_path: Path
    public_path: Path


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_0600(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)  # O_CREAT's mode is filtered by the umask


def _folder(d: str | Path) -> Path:
    from edge.state import private_dir  # the one helper for private folders

    p = Path(d).expanduser()
    private_dir(p)
    return p


def create_key(keys_dir: str | Path, name: str, *, role: str = "device") -> KeyInfo:
    """Create a new key pair; an existing key of that name and role is never overwritten."""
    from edge.fleet.codec import key_id

    if role not in ROLES:
        raise ConfigError(f"key role {role!r} is not one of {', '.join(ROLES)}")
    if not _NAME_RE.match(name) or len(name) > 128:
        raise ConfigError(f"key name {name[:80]!r} is invalid: use letters, digits, '_', '-', '.'")
    d = _folder(keys_dir)
    priv, pub = d / f"{name}.{role}.key", d / f"{name}.{role}.pub"
    if priv.exists() or pub.exists():
        raise KeyFileError(f"a {role} key named {name!r} already exists in {d}; not overwriting it")
    key = generate_key()
    _write_0600(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    _write_0600(pub, public_pem(key))
    return KeyInfo(name=name, role=role, key_id=key_id(key.public_key()).hex(), private_path=priv, public_path=pub)


def list_keys(keys_dir: str | Path) -> list[KeyInfo]:
    """The key pairs in a folder, sorted by name."""
    from edge.fleet.codec import key_id

    d = Path(keys_dir).expanduser()
    out = []
    for pub in sorted(d.glob("*.pub")) if d.is_dir() else ():
        stem = pub.name[:-4]
        name, _, role = stem.rpartition(".")
        if role not in ROLES:
            continue
        out.append(KeyInfo(name=name, role=role, key_id=key_id(load_public(pub)).hex(),
                           private_path=d / f"{stem}.key", public_path=pub))
    return out


def export_public(keys_dir: str | Path, name: str, *, role: str = "device", to: str | Path | None = None) -> bytes | Path:
    """The public key PEM of ``name``; with ``to``, written as ``<to>/<name>.pub`` (0600)."""
    src = Path(keys_dir).expanduser() / f"{name}.{role}.pub"
    pem = load_public(src) and src.read_bytes()
    if to is None:
        return pem
    dst = _folder(to) / f"{name}.pub"
    if dst.exists():
        dst.unlink()
    _write_0600(dst, pem)
    return dst


def load_private(path: str | Path) -> Ed25519PrivateKey:
    p = Path(path).expanduser()
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise KeyFileError(f"cannot read the private key {p}: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{p} is not an Ed25519 private key")
    return key


def load_public(path: str | Path) -> Ed25519PublicKey:
    p = Path(path).expanduser()
    try:
        key = serialization.load_pem_public_key(p.read_bytes())
    except (OSError, ValueError, TypeError) as e:
        raise KeyFileError(f"cannot read the public key {p}: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{p} is not an Ed25519 public key")
    return key


def load_trusted(devices_dir: str | Path) -> dict[str, Ed25519PublicKey]:
    """``{node: public key}`` from ``<node>.pub`` files, as the server's registry reads them
    (``edge.fleet.trust.DeviceRegistry``: unreadable files are skipped and named)."""
    from edge.fleet.trust import DeviceRegistry

    return {n: dk.public_key for n, dk in DeviceRegistry(devices_dir).snapshot.keys.items()}
