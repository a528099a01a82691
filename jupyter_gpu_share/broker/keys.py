"""The broker's receipt signing key: an Ed25519 key in a PEM file only its owner may read.

The key is made at the broker's first start and kept. To rotate it, move the file away
and restart the broker: a new key is made, and the receipts signed from then on carry its
``key_id`` (a new segment of the same chain). Keep the old public key to check old receipts.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)


class KeyFileError(Exception):
    """The key file cannot be used; the message is one line for people."""


def _check_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"receipt key {path} may be read by others (mode {mode:04o}); run: chmod 600 {path}"
        )


def _load(path: Path) -> Ed25519PrivateKey:
    _check_private(path)
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as error:
        raise KeyFileError(f"receipt key {path} is not an unencrypted PEM key: {error}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"receipt key {path} is not an Ed25519 key")
    return key


def load_or_create(path: str | Path) -> Ed25519PrivateKey:
    """Return the key kept at ``path``, making it (mode 0600) if there is none yet."""
    path = Path(path)
    if path.exists():
        return _load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    # Written whole to a private temporary file, then linked into place: a second broker
    # starting at the same instant either links first or reads the finished file.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return _load(path)
    finally:
        temporary.unlink(missing_ok=True)
    return key


def public_pem(key: Ed25519PrivateKey) -> str:
    """Return the PEM (SubjectPublicKeyInfo) of the key's public half."""
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
