"""The keystore: private modes, never overwritten, encrypted at rest, rotation by staging."""

from __future__ import annotations

import os
import stat
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from vpnctl.keystore import Keystore, KeystoreError, decrypt_key, encrypt_key, format_age
from vpnd_runtime.keyfile import fingerprint, load_key


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file's bytes, mode and mtime (ns) below ``root``."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), mode(p), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_generated_key_is_a_runtime_key_file_with_private_modes(tmp_path: Path) -> None:
    store = Keystore(tmp_path / "ks")
    info = store.generate("office")
    assert mode(store.root) == 0o700
    key_path = store.root / "office.key"
    assert mode(key_path) == 0o600
    assert mode(store.meta_path("office")) == 0o600
    key = load_key(key_path)  # the runtime's own loader accepts it
    assert key_path.read_bytes() == (key.hex() + "\n").encode()
    assert info.fingerprint == fingerprint(key)
    assert not info.encrypted


def test_existing_key_is_never_overwritten(tmp_path: Path) -> None:
    store = Keystore(tmp_path / "ks")
    store.generate("office")
    before = snapshot(store.root)
    with pytest.raises(KeystoreError, match="already has a key; vpnctl never overwrites a key"):
        store.generate("office")
    assert snapshot(store.root) == before


def test_keystore_that_others_can_read_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ks"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)  # noqa: S103 - the loose mode under test
    with pytest.raises(KeystoreError) as caught:
        Keystore(root).generate("office")
    assert str(caught.value) == f"{root}: keystore mode 0755 lets others in; run chmod 700 {root}"


def test_encrypted_key_round_trips_and_its_fingerprint_needs_no_passphrase(
    tmp_path: Path,
) -> None:
    store = Keystore(tmp_path / "ks")
    info = store.generate("office", passphrase=b"correct horse")
    assert info.encrypted
    path = store.root / "office.key.enc"
    assert mode(path) == 0o600
    assert path.read_text().startswith("vpnctl-encrypted-key 1\nkdf: scrypt n=131072 r=8 p=1 ")
    assert not (store.root / "office.key").exists()
    assert store.info("office").fingerprint == info.fingerprint  # from the metadata alone
    key = store.load("office", passphrase=b"correct horse")
    assert fingerprint(key) == info.fingerprint
    assert (
        store.key_file_bytes("office", passphrase=b"correct horse") == (key.hex() + "\n").encode()
    )


def test_wrong_passphrase_is_refused_without_revealing_anything(tmp_path: Path) -> None:
    store = Keystore(tmp_path / "ks")
    store.generate("office", passphrase=b"right")
    with pytest.raises(KeystoreError) as caught:
        store.load("office", passphrase=b"wrong")
    assert (
        str(caught.value)
        == f"{store.root / 'office.key.enc'}: wrong passphrase (or the file was altered)"
    )


def test_encrypted_key_moved_to_another_link_does_not_decrypt() -> None:
    sealed = encrypt_key(bytes(32), "office", b"pw")
    with pytest.raises(KeystoreError, match="holds the key of link 'office', not 'lab'"):
        decrypt_key(sealed, "lab", b"pw", "lab.key.enc")
    tampered = sealed.replace(b"link: office", b"link: offic3")
    with pytest.raises(KeystoreError, match="wrong passphrase"):
        decrypt_key(tampered, "offic3", b"pw", "x")


def test_encrypted_key_without_passphrase_asks_for_one(tmp_path: Path) -> None:
    store = Keystore(tmp_path / "ks")
    store.generate("office", passphrase=b"pw")
    with pytest.raises(KeystoreError, match="the key is encrypted; give a passphrase"):
        store.load("office")


def test_rotation_stages_a_new_key_beside_the_current_one(tmp_path: Path) -> None:
    store = Keystore(tmp_path / "ks")
    current = store.generate("office")
    current_bytes = (store.root / "office.key").read_bytes()
    staged = store.generate("office", staged=True)
    assert staged.fingerprint != current.fingerprint
    assert (store.root / "office.key").read_bytes() == current_bytes
    assert store.info("office").fingerprint == current.fingerprint
    assert mode(store.root / "office.next.key") == 0o600
    with pytest.raises(KeystoreError, match="already has a staged key"):
        store.generate("office", staged=True)


def test_promotion_makes_the_staged_key_current_and_keeps_the_old_one(tmp_path: Path) -> None:
    store = Keystore(tmp_path / "ks")
    old = store.generate("office")
    old_bytes = (store.root / "office.key").read_bytes()
    staged = store.generate("office", staged=True)
    promoted = store.promote("office")
    assert promoted.fingerprint == staged.fingerprint
    assert store.info("office").fingerprint == staged.fingerprint
    assert not store.has_key("office", staged=True)
    retired = sorted(store.root.glob("office.retired-*.key"))
    assert [p.read_bytes() for p in retired] == [old_bytes]
    assert fingerprint(load_key(retired[0])) == old.fingerprint


def test_promotion_without_a_staged_key_is_refused(tmp_path: Path) -> None:
    store = Keystore(tmp_path / "ks")
    store.generate("office")
    with pytest.raises(KeystoreError, match=r"has no staged key; run `vpnctl keygen --rotate"):
        store.promote("office")


def test_allocation_record_round_trips_and_is_rewritten_only_on_change(tmp_path: Path) -> None:
    store = Keystore(tmp_path / "ks")
    record = {"east": (IPv4Address("198.19.0.1"), IPv4Address("198.19.0.2"))}
    assert store.save_allocations(record)
    before = snapshot(store.root)
    assert not store.save_allocations(record)
    assert snapshot(store.root) == before
    assert store.load_allocations() == record


def test_age_is_short_and_human() -> None:
    assert [format_age(s) for s in (5, 125, 3 * 3600 + 120, 2 * 86400 + 5 * 3600)] == [
        "5s",
        "2m",
        "3h 2m",
        "2d 5h",
    ]
