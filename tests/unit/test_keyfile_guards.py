"""Guards of the key files that earlier tests did not notice when removed (issue 14).

Each test here fails if its guard is taken out: the owner check of `load_key`, and the O_EXCL of
the keystore's writer against a file that appears between keygen's existence check and the create.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import require
from vpnctl.keystore import Keystore, KeystoreError
from vpnd_runtime.keyfile import KeyFileError, load_key

KEY_LINE = bytes(range(32)).hex() + "\n"
OTHER_UID = 54321  # no such user needed: ownership is just a number to the kernel


def test_a_key_file_owned_by_another_user_is_refused_naming_path_and_uid(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "needs root to give a file to another uid")
    path = tmp_path / "l1.key"
    path.write_text(KEY_LINE)
    path.chmod(0o600)
    assert load_key(path) == bytes(range(32))  # the same file is fine while it is ours
    os.chown(path, OTHER_UID, OTHER_UID)
    with pytest.raises(KeyFileError) as caught:
        load_key(path)
    assert str(caught.value) == (
        f"{path}: key file is owned by uid {OTHER_UID}, not by this user or root"
    )


def test_a_key_file_appearing_after_keygens_check_is_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Keystore(tmp_path / "ks")
    store.create()
    planted = store.root / "office.key"
    # The race: keygen looked, found no key, and then the file appeared before the create.
    monkeypatch.setattr(Keystore, "has_key", lambda self, link, staged=False: False)
    planted.write_text("precious\n")
    planted.chmod(0o600)
    with pytest.raises(KeystoreError) as caught:
        store.generate("office")
    assert str(caught.value) == f"{planted}: already exists; vpnctl never overwrites a key"
    assert planted.read_text() == "precious\n"
    assert not store.meta_path("office").exists()


def test_a_symlink_planted_after_keygens_check_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Keystore(tmp_path / "ks")
    store.create()
    victim = tmp_path / "victim"
    victim.write_text("not yours\n")
    monkeypatch.setattr(Keystore, "has_key", lambda self, link, staged=False: False)
    (store.root / "office.key.enc").symlink_to(victim)
    with pytest.raises(KeystoreError, match="already exists"):
        store.generate("office", passphrase=b"pw")
    assert victim.read_text() == "not yours\n"
