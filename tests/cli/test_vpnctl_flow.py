"""The operator's flow through the typer app: keygen, keys, render, render --check/--diff.

Every test runs in a fresh project directory holding a copy of inventory.example.yaml as
inventory.yaml, and compares whole outputs.
"""

from __future__ import annotations

import json
import shutil
import stat
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
    for var in ("VPNCTL_INVENTORY", "VPNCTL_KEYSTORE", "VPNCTL_BUILD"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def run(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env, input=input)


def fp(project: Path, link: str) -> str:
    meta = json.loads((project / "keystore" / f"{link}.meta.json").read_text())
    return meta["fingerprint"]


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def lab_pair(project: Path) -> tuple[str, str]:
    record = json.loads((project / "keystore" / "allocations.json").read_text())
    return record["links"]["lab"]["server"], record["links"]["lab"]["client"]


def test_keygen_render_check_works_from_the_example_inventory(project: Path) -> None:
    keygen = run("keygen")
    assert keygen.exit_code == 0, keygen.output
    assert keygen.stdout == (
        f"created office  {fp(project, 'office')}\ncreated lab     {fp(project, 'lab')}\n"
    )
    render = run("render")
    assert render.exit_code == 0, render.output
    assert render.stdout == (
        "created build/alpha/etc/vpnd/lab.conf\n"
        "created build/alpha/etc/vpnd/office.conf\n"
        "created build/alpha/manifest.json\n"
        "created build/alpha/systemd/vpnd-lab.service\n"
        "created build/alpha/systemd/vpnd-office.service\n"
        "created build/beta/etc/vpnd/office.conf\n"
        "created build/beta/manifest.json\n"
        "created build/beta/systemd/vpnd-office.service\n"
        "created build/gamma/etc/vpnd/lab.conf\n"
        "created build/gamma/manifest.json\n"
        "rendered 2 link(s) for 3 host(s) into build/: 10 file(s) changed\n"
    )
    check = run("render", "--check")
    assert check.exit_code == 0, check.output
    server, client = lab_pair(project)
    assert check.stdout == (
        f"ok    office: alpha 198.18.255.1 <-> 198.18.255.2 beta  tcp/379  key "
        f"{fp(project, 'office')}\n"
        f"ok    lab: alpha {server} <-> {client} gamma  tcp/380  key {fp(project, 'lab')}\n"
        "all 2 link(s) mirror; build/ is up to date\n"
    )


def test_second_keygen_changes_no_byte_of_the_keystore(project: Path) -> None:
    assert run("keygen").exit_code == 0
    before = snapshot(project / "keystore")
    again = run("keygen")
    assert again.exit_code == 0
    assert again.stdout == (
        f"kept    office  {fp(project, 'office')}\nkept    lab     {fp(project, 'lab')}\n"
    )
    assert snapshot(project / "keystore") == before


def test_keystore_and_key_files_are_private(project: Path) -> None:
    assert run("keygen").exit_code == 0
    keystore = project / "keystore"
    assert stat.S_IMODE(keystore.stat().st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in keystore.iterdir()}
    assert modes == {
        "office.key": 0o600,
        "office.meta.json": 0o600,
        "lab.key": 0o600,
        "lab.meta.json": 0o600,
        "allocations.json": 0o600,
    }


def test_render_output_is_deterministic(project: Path) -> None:
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    first = {k: v[0] for k, v in snapshot(project / "build").items()}
    shutil.rmtree(project / "build")
    assert run("render").exit_code == 0
    assert {k: v[0] for k, v in snapshot(project / "build").items()} == first
    again = run("render")
    assert again.stdout == "rendered 2 link(s) for 3 host(s) into build/: no changes\n"


def test_rendered_pair_swaps_addresses_and_points_routes_at_the_peer(project: Path) -> None:
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    server = (project / "build/alpha/etc/vpnd/office.conf").read_text()
    client = (project / "build/beta/etc/vpnd/office.conf").read_text()
    assert "mode server\nserver 0 379\nlocal 198.18.255.1\nremote 198.18.255.2\n" in server
    assert "mode client\nserver 198.18.1.1 379\nlocal 198.18.255.2\nremote 198.18.255.1\n" in client
    assert "route1 198.18.20.0 255.255.255.0 198.18.255.2\n" in server
    assert "route1 198.18.10.0 255.255.255.0 198.18.255.1\n" in client
    gamma = (project / "build/gamma/etc/vpnd/lab.conf").read_text()
    assert "keyfile /opt/vpnd/etc/vpnd/lab.key\npidfile /opt/vpnd/run/vpnd/lab.pid\n" in gamma
    assert not (project / "build/gamma/systemd").exists()  # gamma has systemd: false


def test_manifest_lists_every_file_with_its_sha256_and_no_key(project: Path) -> None:
    import hashlib

    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    manifest = json.loads((project / "build/beta/manifest.json").read_text())
    entry = manifest["links"]["office"]
    assert (manifest["host"], manifest["prefix"], manifest["systemd"]) == ("beta", "/", "auto")
    assert entry["key_fingerprint"] == fp(project, "office")
    assert entry["keyfile"] == "/etc/vpnd/office.key"
    assert entry["unit"] == "vpnd-office.service"
    for rel, digest in entry["files"].items():
        assert hashlib.sha256((project / "build/beta" / rel).read_bytes()).hexdigest() == digest
    key_hex = (project / "keystore/office.key").read_text().strip()
    for path in (project / "build").rglob("*"):
        if path.is_file():
            assert key_hex not in path.read_text()


def test_keys_lists_fingerprints_and_ages_never_keys(project: Path) -> None:
    assert run("keygen").exit_code == 0
    listing = run("keys")
    assert listing.exit_code == 0, listing.output
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["LINK", "FINGERPRINT", "AGE", "STORED", "STAGED"]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["office", fp(project, "office")],
        ["lab", fp(project, "lab")],
    ]
    assert all(line.split()[3:] == ["plain", "-"] for line in lines[1:])
    key_hex = (project / "keystore/office.key").read_text().strip()
    assert key_hex not in listing.output


def test_keys_before_keygen_reports_missing_keys_with_exit_1(project: Path) -> None:
    listing = run("keys")
    assert listing.exit_code == 1
    assert listing.stdout == (
        "LINK    FINGERPRINT                  AGE  STORED  STAGED\n"
        "office  (no key: run vpnctl keygen)  -    -       -\n"
        "lab     (no key: run vpnctl keygen)  -    -       -\n"
    )


def test_rotate_stages_a_key_that_render_ignores_until_promoted(project: Path) -> None:
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    old = fp(project, "office")
    staged = run("keygen", "--rotate", "office")
    assert staged.exit_code == 0, staged.output
    new = json.loads((project / "keystore/office.next.meta.json").read_text())["fingerprint"]
    assert staged.stdout == (
        f"staged  office  {new} beside {old}; `vpnctl keygen --promote office` makes it current\n"
    )
    assert run("render", "--check").exit_code == 0  # still the current key
    promoted = run("keygen", "--promote", "office")
    assert promoted.stdout == f"promoted office  {new}  (now current; re-render and deploy)\n"
    check = run("render", "--check")
    assert check.exit_code == 1
    assert (
        f"FAIL  link office: rendered with key {old}, the keystore holds {new}; run `vpnctl "
        "render`\n" in check.stdout
    )
    assert run("render").exit_code == 0
    assert run("render", "--check").exit_code == 0


def test_encrypted_keygen_takes_the_passphrase_from_an_environment_variable(
    project: Path,
) -> None:
    result = run("keygen", "--passphrase-env", "VPN_PW", env={"VPN_PW": "s3cret"})
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"created office  {fp(project, 'office')}  (encrypted)\n"
        f"created lab     {fp(project, 'lab')}  (encrypted)\n"
    )
    assert (project / "keystore/office.key.enc").read_text().startswith("vpnctl-encrypted-key 1\n")
    assert run("render").exit_code == 0  # rendering needs only the fingerprints
    assert run("render", "--check").exit_code == 0


def test_encrypted_keygen_prompts_twice_when_no_source_is_given(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("vpnctl.commands.keygen.can_prompt", lambda: True)  # as on a terminal
    result = run("keygen", "--encrypt", input="pw\npw\n")
    assert result.exit_code == 0, result.output
    assert (project / "keystore/lab.key.enc").exists()
    assert "pw" not in result.stdout


def test_passphrase_file_that_is_empty_is_a_user_error(project: Path) -> None:
    (project / "pw.txt").write_text("")
    result = run("keygen", "--passphrase-file", "pw.txt")
    assert result.exit_code == 2
    assert result.stderr == "vpnctl: pw.txt: the passphrase file is empty\n"
    assert not (project / "keystore/office.key.enc").exists()


def test_diff_shows_what_render_would_change_without_writing(project: Path) -> None:
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    assert run("render", "--diff").stdout == ""
    inventory = project / "inventory.yaml"
    inventory.write_text(
        inventory.read_text().replace("    keepalive: 20\n", "    keepalive: 15\n")
    )
    before = snapshot(project / "build")
    diff = run("render", "--diff")
    assert diff.exit_code == 1
    conf = (
        "@@ -10,8 +10,8 @@\n"
        " pidfile /run/vpnd/office.pid\n"
        " statusfile /run/vpnd/office.status.json\n"
        " \n"
        "-# Liveness: ping every 20 s; dead after 6 unanswered pings.\n"
        "-keepalive 20\n"
        "+# Liveness: ping every 15 s; dead after 6 unanswered pings.\n"
        "+keepalive 15\n"
        " noanswer 6\n"
        " \n"
        " # Session keys: chacha20-poly1305, renewed every 120 s.\n"
    )
    assert (
        f"--- a/build/alpha/etc/vpnd/office.conf\n+++ b/build/alpha/etc/vpnd/office.conf\n{conf}"
        in diff.stdout
    )
    assert (
        f"--- a/build/beta/etc/vpnd/office.conf\n+++ b/build/beta/etc/vpnd/office.conf\n{conf}"
        in diff.stdout
    )
    changed = [line[6:] for line in diff.stdout.splitlines() if line.startswith("--- a/")]
    assert changed == [
        "build/alpha/etc/vpnd/office.conf",
        "build/alpha/manifest.json",
        "build/beta/etc/vpnd/office.conf",
        "build/beta/manifest.json",
    ]
    assert snapshot(project / "build") == before


def test_check_fails_when_a_rendered_config_was_edited_to_mismatch(project: Path) -> None:
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    conf = project / "build/beta/etc/vpnd/office.conf"
    conf.write_text(conf.read_text().replace("server 198.18.1.1 379", "server 198.18.1.1 380"))
    check = run("render", "--check")
    assert check.exit_code == 1
    server, client = lab_pair(project)
    assert check.stdout == (
        f"ok    lab: alpha {server} <-> {client} gamma  tcp/380  key {fp(project, 'lab')}\n"
        "FAIL  build/beta/etc/vpnd/office.conf: sha256 differs from build/beta/manifest.json "
        "(edited by hand?)\n"
        "FAIL  link office: server listens on port 379, client dials 380\n"
        "FAIL  build/beta/etc/vpnd/office.conf: out of date with the inventory; run "
        "`vpnctl render`\n"
    )
    assert check.stderr == "3 problem(s) in build/\n"


def test_check_before_render_says_what_to_run(project: Path) -> None:
    assert run("keygen").exit_code == 0
    check = run("render", "--check")
    assert check.exit_code == 1
    assert check.stdout.splitlines()[:3] == [
        "FAIL  build/alpha/manifest.json: missing; run `vpnctl render`",
        "FAIL  build/beta/manifest.json: missing; run `vpnctl render`",
        "FAIL  build/gamma/manifest.json: missing; run `vpnctl render`",
    ]


def test_render_without_keys_is_a_user_error_with_no_traceback(project: Path) -> None:
    (project / "keystore").mkdir(mode=0o700)
    result = run("render")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == (
        "vpnctl: keystore: no key for link(s) office, lab; run `vpnctl keygen` first\n"
    )


def test_invalid_inventory_is_reported_with_line_and_exit_2(project: Path) -> None:
    inventory = project / "inventory.yaml"
    text = inventory.read_text().replace(
        "      server: 198.18.255.1\n", "      server: 198.18.1.2\n"
    )
    inventory.write_text(text)
    line = text.splitlines().index("      server: 198.18.1.2") + 1
    for command in (["keygen"], ["render"], ["keys"]):
        result = run(*command)
        assert result.exit_code == 2
        assert result.stdout == ""
        assert result.stderr == (
            f"vpnctl: inventory.yaml:{line} links[0].tunnel.server: 198.18.1.2 is the underlay "
            "address of hosts[1].address\n"
        )
    assert not (project / "keystore").exists()


def test_missing_inventory_points_at_the_example(project: Path) -> None:
    result = run("-i", "nope.yaml", "keygen")
    assert result.exit_code == 2
    assert result.stderr == (
        "vpnctl: nope.yaml: no such inventory file (start from inventory.example.yaml: "
        "cp inventory.example.yaml inventory.yaml)\n"
    )


def test_inventory_keystore_and_build_paths_come_from_the_environment(project: Path) -> None:
    (project / "inventory.yaml").rename(project / "site.yaml")
    env = {"VPNCTL_INVENTORY": "site.yaml", "VPNCTL_KEYSTORE": "ks", "VPNCTL_BUILD": "out"}
    assert run("keygen", env=env).exit_code == 0
    assert run("render", env=env).exit_code == 0
    assert (project / "ks/office.key").exists()
    assert (project / "out/alpha/manifest.json").exists()
    assert run("render", "--check", env=env).exit_code == 0


def test_help_teaches_the_flow() -> None:
    result = run("--help")
    assert result.exit_code == 0
    assert "vpnctl keygen" in result.stdout
    assert "render --check" in result.stdout
    assert "VPNCTL_INVENTORY" in result.stdout
    render_help = run("render", "--help")
    assert "--check" in render_help.stdout and "--diff" in render_help.stdout


def test_keys_json_carries_the_same_facts_as_the_table(project: Path) -> None:
    assert run("keygen").exit_code == 0
    result = run("keys", "--json")
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert document["keystore"] == "keystore"
    assert [(row["link"], row["fingerprint"], row["stored"]) for row in document["links"]] == [
        ("office", fp(project, "office"), "plain"),
        ("lab", fp(project, "lab"), "plain"),
    ]
    assert all(0 <= row["age_seconds"] < 600 for row in document["links"])


def test_render_removes_files_of_a_link_dropped_from_the_inventory(project: Path) -> None:
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    inventory = project / "inventory.yaml"
    text = inventory.read_text()
    inventory.write_text(text[: text.index("  - name: lab\n")])
    result = run("render")
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "updated build/alpha/manifest.json\n"
        "updated build/gamma/manifest.json\n"
        "removed build/alpha/etc/vpnd/lab.conf\n"
        "removed build/alpha/systemd/vpnd-lab.service\n"
        "removed build/gamma/etc/vpnd/lab.conf\n"
        "rendered 1 link(s) for 3 host(s) into build/: 5 file(s) changed\n"
    )
    assert sorted(p.name for p in (project / "build/gamma").rglob("*")) == ["manifest.json"]
    assert run("render", "--check").exit_code == 0
