"""The keystore's passphrase KDF: strong enough for new files, bounded for files we are given.

New encrypted key files use scrypt with N = 2^17 (OWASP's current minimum, ~128 MiB); files
written earlier with N = 2^15 still open.  A header may not ask for more than the cap: a crafted
file asking for 16 GiB is refused naming the file, before scrypt runs.
"""

from __future__ import annotations

import re

import pytest

from vpnctl import keystore
from vpnctl.keystore import Keystore, KeystoreError, decrypt_key, encrypt_key


def _kdf_line(data: bytes) -> dict[str, int]:
    m = re.search(rb"kdf: scrypt n=(\d+) r=(\d+) p=(\d+) ", data)
    assert m is not None, data
    return {"n": int(m[1]), "r": int(m[2]), "p": int(m[3])}


def test_new_encrypted_key_files_use_scrypt_n_of_at_least_2_to_the_17(tmp_path) -> None:
    store = Keystore(tmp_path / "ks")
    store.generate("office", passphrase=b"pw")
    params = _kdf_line((store.root / "office.key.enc").read_bytes())
    assert params["n"] >= 2**17
    assert params["r"] >= 8
    assert store.load("office", passphrase=b"pw")


def test_a_file_written_with_the_older_n_2_to_the_15_still_opens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(keystore, "SCRYPT_N", 2**15)
    sealed = encrypt_key(bytes(32), "office", b"pw")
    assert _kdf_line(sealed)["n"] == 2**15
    monkeypatch.undo()
    assert decrypt_key(sealed, "office", b"pw", "office.key.enc") == bytes(32)


@pytest.mark.parametrize(
    ("n", "r", "p"),
    [
        (2**22, 32, 1),  # 16 GiB of memory
        (2**20, 8, 1),  # 1 GiB
        (2**17, 8, 16),  # 128 MiB but 16 times the work
    ],
)
def test_a_header_asking_for_more_than_the_cap_is_refused_before_scrypt_runs(
    n: int, r: int, p: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    sealed = encrypt_key(bytes(32), "office", b"pw")
    crafted = re.sub(rb"n=\d+ r=\d+ p=\d+", f"n={n} r={r} p={p}".encode(), sealed)

    def no_scrypt(*args: object) -> bytes:
        raise AssertionError("scrypt ran on a header above the cap")

    monkeypatch.setattr(keystore, "_aead_key", no_scrypt)
    with pytest.raises(KeystoreError) as caught:
        decrypt_key(crafted, "office", b"pw", "/ks/office.key.enc")
    message = str(caught.value)
    assert message.startswith(f"/ks/office.key.enc: scrypt parameters n={n} r={r} p={p} ")
    assert "at most" in message
