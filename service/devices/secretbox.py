"""Device secrets encrypted at rest: AES-256-GCM under a key file only the service user can read.

Checking an EnOS signature needs the device secret in clear, so secrets cannot be hashed; instead the
database holds ``version byte | 12-byte nonce | ciphertext+tag``, with the device's ``pk/dk`` as
associated data so a sealed secret copied onto another device's row does not open. A stolen database
dump is useless without the key file, which lives outside the database (``secret_key_file``, default
``<data_dir>/secret.key``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.errors import ConfigError, SecretUnreadable
from service.settings import Settings

KEY_BYTES = 32
_VERSION = b"\x01"  # lets a later format (or key rotation) coexist with rows sealed by this one
_NONCE_BYTES = 12
_TAG_BYTES = 16


def new_secret() -> str:
    """A fresh device secret (32 URL-safe characters, 192 bits)."""
    return secrets.token_urlsafe(24)


class SecretBox:
    """Seals and opens device secrets with one AES-256-GCM key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ConfigError(f"secret key must be {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "SecretBox(<key hidden>)"

    def seal(self, plaintext: str, *, aad: bytes) -> bytes:
        """Encrypt ``plaintext``, bound to ``aad`` (the device's ``b"pk/dk"``)."""
        # random 96-bit nonces are safe far beyond the number of secrets one registry will ever seal
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext.encode("utf-8"), aad)

    def open(self, token: bytes, *, aad: bytes) -> str:
        """Decrypt a token from `seal` made with the same ``aad``, or raise `SecretUnreadable`."""
        if len(token) < 1 + _NONCE_BYTES + _TAG_BYTES or token[:1] != _VERSION:
            raise SecretUnreadable("sealed secret has an unknown format")
        nonce, body = token[1 : 1 + _NONCE_BYTES], token[1 + _NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, body, aad).decode("utf-8")
        except InvalidTag:
            raise SecretUnreadable(
                "sealed secret does not open: wrong secret key file, or the row was altered or moved"
            ) from None


def key_path(settings: Settings) -> Path:
    """Where the secret key lives: ``secret_key_file``, else ``<data_dir>/secret.key``."""
    return settings.secret_key_file or settings.data_dir / "secret.key"


def load_or_create_key(path: Path) -> bytes:
    """Read the base64 key in ``path``, creating it (mode 0600) on first use; refuse a readable-by-others file."""
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    # another process may create it between our read and our create: then we use theirs
    with contextlib.suppress(FileExistsError):
        _create_key(path)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"secret key file {path} has mode {stat.S_IMODE(mode):04o}; it must be 0600 (chmod 600)")
    try:
        key = base64.b64decode(path.read_bytes().strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"secret key file {path} is not base64") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(f"secret key file {path} holds {len(key)} bytes; it must hold {KEY_BYTES}")
    return key


def _create_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write a private temporary file, then link it into place: the link fails if the key appeared meanwhile
    # (so a key in use is never replaced) and nobody can ever read a half-written key.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(base64.b64encode(os.urandom(KEY_BYTES)) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
