"""Issue 12, the operator's first ten minutes: whole-output CLI tests, exit codes 0/1/2.

Each test works in a fresh project directory holding a copy of inventory.example.yaml (or a
two-host workspace) and compares what the operator sees, stdout and stderr, as a whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from vpnctl.cli import app

REPO = Path(__file__).resolve().parent.parent.parent
EXAMPLE = REPO / "inventory.example.yaml"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project directory with inventory.yaml copied from the example, as the cwd."""
    shutil.copy(EXAMPLE, tmp_path / "inventory.yaml")
    monkeypatch.chdir(tmp_path)
    for var in ("VPNCTL_INVENTORY", "VPNCTL_KEYSTORE", "VPNCTL_BUILD", "NO_COLOR", "COLUMNS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def run(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env, input=input)


def fp(project: Path, link: str) -> str:
    return json.loads((project / "keystore" / f"{link}.meta.json").read_text())["fingerprint"]


# ---- 1. fingerprints come from the key file --------------------------------------------------


def test_a_garbage_key_is_refused_by_keys_render_and_keygen_naming_the_file(
    project: Path,
) -> None:
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    (project / "keystore/lab.key").write_text("garbage\n")
    message = (
        "vpnctl: keystore/lab.key: malformed key file: non-hex characters; expected one line "
        "of 64 hex digits (a 32-byte key)\n"
    )
    for args in (("keys",), ("render", "--check"), ("render",), ("keygen",)):
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr == message, args
    # nothing was printed as if the key were fine
    assert run("keys").stdout == ""


def test_a_key_others_can_read_is_refused_naming_the_file(project: Path) -> None:
    assert run("keygen").exit_code == 0
    os.chmod(project / "keystore/office.key", 0o644)
    for args in (("keys",), ("render",), ("keygen",)):
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr == (
            "vpnctl: keystore/office.key: key file mode 0644 lets others read it; "
            "run chmod 600 keystore/office.key\n"
        )


def test_a_swapped_key_shows_its_own_fingerprint_and_render_check_fails(project: Path) -> None:
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    old = fp(project, "lab")
    key = project / "keystore/lab.key"
    os.chmod(key, 0o600)
    key.write_text("ab" * 32 + "\n")
    from vpnd_runtime.keyfile import fingerprint

    new = fingerprint(bytes.fromhex("ab" * 32))
    listing = run("keys", "--json")
    assert listing.exit_code == 0
    assert [row["fingerprint"] for row in json.loads(listing.stdout)["links"]] == [
        fp(project, "office"),
        new,
    ]
    check = run("render", "--check")
    assert check.exit_code == 1
    assert (
        f"FAIL  link lab: rendered with key {old}, the keystore holds {new}; run `vpnctl "
        "render`\n" in check.stdout
    )


def test_a_malformed_encrypted_key_is_refused_without_the_passphrase(project: Path) -> None:
    assert run("keygen", "--passphrase-env", "PW", env={"PW": "pw"}).exit_code == 0
    (project / "keystore/lab.key.enc").write_text("not encrypted\n")
    result = run("keys")
    assert result.exit_code == 2
    assert result.stderr == (
        "vpnctl: keystore/lab.key.enc: malformed encrypted key file (not the "
        "'vpnctl-encrypted-key 1' format)\n"
    )


# ---- 4. keystore/ and build/ follow the inventory --------------------------------------------


def test_keystore_and_build_default_to_the_inventory_directory(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = project / "some" / "where"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    keygen = run("-i", "../../inventory.yaml", "keygen")
    assert keygen.exit_code == 0, keygen.output
    assert (project / "keystore/office.key").exists()
    render = run("-i", "../../inventory.yaml", "render")
    assert render.exit_code == 0, render.output
    assert render.stdout.splitlines()[-1] == (
        "rendered 2 link(s) for 3 host(s) into ../../build/: 10 file(s) changed"
    )
    assert (project / "build/alpha/manifest.json").exists()
    assert sorted(p.name for p in elsewhere.iterdir()) == []
    # the explicit options still win
    other = run("-i", "../../inventory.yaml", "--keystore", "ks", "keys")
    assert other.exit_code == 1
    assert "(no key: run vpnctl keygen)" in other.stdout
