"""Device secrets sealed with AES-256-GCM, and the key file that protects them."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from service.devices.secretbox import KEY_BYTES, SecretBox, key_path, load_or_create_key, new_secret
from service.errors import ConfigError, SecretUnreadable
from service.settings import load_settings

AAD = b"pk1/dk1"


@pytest.fixture
def box() -> SecretBox:
    return SecretBox(os.urandom(KEY_BYTES))


def test_round_trip(box: SecretBox) -> None:
    """A sealed secret opens to the same text, and the token does not contain it."""
    token = box.seal("päss-wörd", aad=AAD)
    assert "päss-wörd".encode() not in token
    assert box.open(token, aad=AAD) == "päss-wörd"


def test_sealing_twice_gives_different_tokens(box: SecretBox) -> None:
    """Each seal uses a fresh nonce, so equal secrets do not give equal rows."""
    assert box.seal("same", aad=AAD) != box.seal("same", aad=AAD)


def test_token_moved_to_another_device_does_not_open(box: SecretBox) -> None:
    """The pk/dk associated data binds a token to its device."""
    token = box.seal("secret", aad=AAD)
    with pytest.raises(SecretUnreadable):
        box.open(token, aad=b"pk1/dk2")


@pytest.mark.parametrize("index", [0, 1, 13, -1])
def test_tampered_token_does_not_open(box: SecretBox, index: int) -> None:
    """Flipping any byte (version, nonce, ciphertext or tag) is detected."""
    token = bytearray(box.seal("secret", aad=AAD))
    token[index] ^= 0x01
    with pytest.raises(SecretUnreadable):
        box.open(bytes(token), aad=AAD)


def test_truncated_token_and_other_key_do_not_open(box: SecretBox) -> None:
    """A short token, or a token from another key, is refused rather than decrypted to garbage."""
    token = box.seal("secret", aad=AAD)
    with pytest.raises(SecretUnreadable):
        box.open(token[:20], aad=AAD)
    with pytest.raises(SecretUnreadable):
        SecretBox(os.urandom(KEY_BYTES)).open(token, aad=AAD)


def test_key_must_be_32_bytes() -> None:
    """An AES-128 sized key is refused."""
    with pytest.raises(ConfigError):
        SecretBox(os.urandom(16))


def test_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    """A missing key file is created with mode 0600 (parents too) and read back unchanged next time."""
    path = tmp_path / "nested" / "secret.key"
    key = load_or_create_key(path)
    assert len(key) == KEY_BYTES
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == key
    assert [p.name for p in path.parent.iterdir()] == ["secret.key"]  # no temporary file left behind


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    """A key file with group or other permissions is refused, naming the file and the fix."""
    path = tmp_path / "secret.key"
    load_or_create_key(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"secret\.key.*0644.*chmod 600"):
        load_or_create_key(path)


def test_key_file_of_wrong_length_is_refused(tmp_path: Path) -> None:
    """A key file holding other than 32 bytes is refused rather than silently used."""
    path = tmp_path / "secret.key"
    path.write_bytes(base64.b64encode(os.urandom(16)))
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="16 bytes"):
        load_or_create_key(path)


def test_key_file_that_is_not_base64_is_refused(tmp_path: Path) -> None:
    """A key file with non-base64 content is refused."""
    path = tmp_path / "secret.key"
    path.write_bytes(b"not base64 at all!")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="base64"):
        load_or_create_key(path)


def test_key_path_defaults_to_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key lives in data_dir unless secret_key_file names another place."""
    monkeypatch.delenv("POINTGATE_SECRET_KEY_FILE", raising=False)
    assert key_path(load_settings({"data_dir": tmp_path})) == tmp_path / "secret.key"
    assert key_path(load_settings({"data_dir": tmp_path, "secret_key_file": tmp_path / "k"})) == tmp_path / "k"


def test_new_secrets_are_long_and_distinct() -> None:
    """Generated secrets carry 192 bits and do not repeat."""
    secrets = {new_secret() for _ in range(100)}
    assert len(secrets) == 100
    assert all(len(s) == 32 for s in secrets)
