"""Key files: created 0600 and never overwritten; loaded only when private and well formed."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from tests.conftest import require
from vpnd_runtime.keyfile import KeyFileError, fingerprint, generate_key, load_key, user_uid

KEY = bytes(range(32))


@pytest.fixture
def randomdev(tmp_path: Path) -> Path:
    """A regular file standing in for /dev/random (allowed for tests)."""
    path = tmp_path / "random"
    path.write_bytes(KEY + b"extra bytes that must not be used")
    return path


def write_key_file(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_generated_key_is_32_bytes_from_randomdev_in_a_0600_hex_file(tmp_path, randomdev):
    path = tmp_path / "l1.key"
    key = generate_key(path, str(randomdev))
    assert key == KEY
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == KEY.hex() + "\n"
    assert load_key(path) == KEY


def test_generated_key_is_0600_even_with_a_permissive_umask(tmp_path, randomdev):
    old = os.umask(0)
    try:
        path = tmp_path / "k"
        generate_key(path, str(randomdev))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_generate_key_from_the_real_random_device_differs_each_time(tmp_path):
    first = generate_key(tmp_path / "a", "/dev/urandom")
    second = generate_key(tmp_path / "b", "/dev/urandom")
    assert len(first) == len(second) == 32
    assert first != second


def test_generate_key_refuses_to_overwrite_an_existing_file(tmp_path, randomdev):
    path = tmp_path / "l1.key"
    path.write_text("precious\n")
    with pytest.raises(KeyFileError) as info:
        generate_key(path, str(randomdev))
    assert str(path) in str(info.value)
    assert "refusing to overwrite" in str(info.value)
    assert path.read_text() == "precious\n"


def test_generate_key_refuses_a_dangling_symlink(tmp_path, randomdev):
    link = tmp_path / "l1.key"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(KeyFileError):
        generate_key(link, str(randomdev))
    assert not (tmp_path / "elsewhere").exists()


def test_short_random_source_is_an_error_and_leaves_no_file(tmp_path):
    short = tmp_path / "short"
    short.write_bytes(b"\x01" * 31)
    path = tmp_path / "l1.key"
    with pytest.raises(KeyFileError) as info:
        generate_key(path, str(short))
    assert "31 of 32 bytes" in str(info.value)
    assert str(short) in str(info.value)
    assert not path.exists()


def test_missing_random_source_is_named(tmp_path):
    with pytest.raises(KeyFileError) as info:
        generate_key(tmp_path / "k", str(tmp_path / "no-such-dev"))
    assert "no-such-dev" in str(info.value)


def test_generate_key_into_a_missing_directory_names_the_path(tmp_path, randomdev):
    path = tmp_path / "missing" / "k"
    with pytest.raises(KeyFileError) as info:
        generate_key(path, str(randomdev))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601, 0o610])
def test_load_key_refuses_group_or_other_permissions_naming_path_and_mode(tmp_path, mode):
    path = write_key_file(tmp_path / "l1.key", KEY.hex().encode() + b"\n", mode)
    with pytest.raises(KeyFileError) as info:
        load_key(path)
    message = str(info.value)
    assert f"{mode:04o}" in message
    assert f"chmod 600 {path}" in message
    assert KEY.hex() not in message


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_load_key_accepts_owner_only_modes(tmp_path, mode):
    path = write_key_file(tmp_path / "l1.key", KEY.hex().encode() + b"\n", mode)
    assert load_key(path) == KEY


@pytest.mark.parametrize(
    "content",
    [
        KEY.hex().encode(),  # no final newline
        KEY.hex().upper().encode() + b"\n",
        KEY.hex().encode() + b"\r\n",
    ],
)
def test_load_key_tolerates_case_and_line_ending_variants(tmp_path, content):
    assert load_key(write_key_file(tmp_path / "k", content)) == KEY


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "0 hex digits"),
        (KEY.hex()[:-2].encode() + b"\n", "62 hex digits"),
        (KEY.hex().encode() + b"ab\n", "66 hex digits"),
        (KEY.hex()[:-1].encode() + b"g\n", "non-hex"),
        (KEY.hex().encode() + b"\n\n", "non-hex"),
        (b" " + KEY.hex().encode() + b"\n", "non-hex"),
        (bytes(range(200, 232)) + b"\n", "not text"),
        (b"0" * 5000, "too large"),
    ],
)
def test_load_key_refuses_malformed_content_without_showing_it(tmp_path, content, fragment):
    path = write_key_file(tmp_path / "l1.key", content)
    with pytest.raises(KeyFileError) as info:
        load_key(path)
    message = str(info.value)
    assert fragment in message
    assert str(path) in message
    assert KEY.hex()[:16] not in message.lower()
    assert repr(KEY)[2:20] not in message


def test_load_key_refuses_a_directory(tmp_path):
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o700)
    with pytest.raises(KeyFileError) as info:
        load_key(directory)
    assert "not a regular file" in str(info.value)


def test_load_key_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyFileError) as info:
        load_key(fifo)
    assert "not a regular file" in str(info.value)


def test_load_key_names_a_missing_file(tmp_path):
    with pytest.raises(KeyFileError) as info:
        load_key(tmp_path / "absent.key")
    assert str(tmp_path / "absent.key") in str(info.value)
    assert isinstance(info.value, ValueError)


def test_fingerprint_is_blake2s_personalised_grouped_and_stable():
    digest = hashlib.blake2s(KEY, person=b"vpndfp").hexdigest()[:16]
    expected = ":".join(digest[i : i + 4] for i in range(0, 16, 4))
    assert fingerprint(KEY) == expected
    assert fingerprint(KEY) == fingerprint(bytes(KEY))
    assert len(fingerprint(KEY)) == 19
    assert fingerprint(KEY) != fingerprint(bytes(32))


def test_fingerprint_rejects_a_wrong_length_key_without_echoing_it():
    with pytest.raises(ValueError) as info:
        fingerprint(KEY[:31])
    assert KEY[:31].hex() not in str(info.value)


def test_a_key_of_the_daemons_user_is_accepted_and_of_anyone_else_refused(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "chown to another uid needs root")
    key = tmp_path / "k.key"
    generate_key(key, randomdev="/dev/urandom")
    os.chown(key, 65534, 65534)
    # The daemon starts as root and drops to `user`: that account's key is its own
    assert len(load_key(key, owner=65534)) == 32
    assert user_uid("65534") == 65534 and user_uid(None) is None
    # Anyone else's is refused, and the message names the uids
    with pytest.raises(KeyFileError, match=r"owned by uid 65534.*daemon's user \(uid 1234\)"):
        load_key(key, owner=1234)
    with pytest.raises(KeyFileError, match="owned by uid 65534, not by this user or root"):
        load_key(key)
