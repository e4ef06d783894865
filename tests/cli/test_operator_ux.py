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


# ---- 2. pre-flight once, before any host -----------------------------------------------------

UNREACHABLE_HOSTS = """version: 1
defaults:
  ssh:
    options: [ConnectTimeout=2, BatchMode=yes]
hosts:
  - name: alpha
    address: 198.18.1.1
    ssh: {host: 127.0.0.1, port: 1}
  - name: beta
    address: 198.18.1.2
    ssh: {host: 127.0.0.1, port: 1}
links:
  - name: ab
    server: alpha
    client: beta
"""


@pytest.fixture
def closed(project: Path) -> Path:
    """The project with two hosts whose ssh goes to a closed loopback port (refused at once)."""
    (project / "inventory.yaml").write_text(UNREACHABLE_HOSTS)
    return project


def test_a_wrong_passphrase_is_one_message_before_any_host(closed: Path) -> None:
    assert run("keygen", "--passphrase-env", "PW", env={"PW": "right"}).exit_code == 0
    assert run("render").exit_code == 0
    result = run("deploy", "--dry-run", "--all", "--passphrase-env", "PW", env={"PW": "wrong"})
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == (
        "vpnctl: keystore/ab.key.enc: wrong passphrase (or the file was altered)\n"
    )


def test_without_a_terminal_deploy_never_prompts_for_the_passphrase(closed: Path) -> None:
    assert run("keygen", "--passphrase-env", "PW", env={"PW": "right"}).exit_code == 0
    assert run("render").exit_code == 0
    result = run("deploy", "--dry-run", "--all")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == (
        "vpnctl: a passphrase is needed and there is no terminal to ask it on: give "
        "--passphrase-env VAR or --passphrase-file FILE\n"
    )


def test_a_broken_key_stops_deploy_before_any_host(closed: Path) -> None:
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    os.chmod(closed / "keystore/ab.key", 0o640)
    result = run("deploy", "--all")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == (
        "vpnctl: keystore/ab.key: key file mode 0640 lets others read it; "
        "run chmod 600 keystore/ab.key\n"
    )


# ---- 5. a stale build is refused -------------------------------------------------------------


def test_deploy_refuses_a_build_older_than_the_inventory(closed: Path) -> None:
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    inventory = closed / "inventory.yaml"
    inventory.write_text(
        inventory.read_text().replace("    client: beta\n", "    client: beta\n    keepalive: 7\n")
    )
    result = run("deploy", "--all")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == (
        "vpnctl: build/ does not match inventory.yaml and keystore/ (4 file(s) differ: "
        "build/alpha/etc/vpnd/ab.conf, build/alpha/manifest.json, build/beta/etc/vpnd/ab.conf "
        "and 1 more); run `vpnctl render` first\n"
    )


def test_deploy_refuses_a_build_with_a_link_no_longer_in_the_inventory(closed: Path) -> None:
    inventory = closed / "inventory.yaml"
    inventory.write_text(
        UNREACHABLE_HOSTS + "  - name: ba\n    server: beta\n    client: alpha\n    port: 380\n"
    )
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    inventory.write_text(UNREACHABLE_HOSTS)
    result = run("deploy", "--dry-run", "alpha")
    assert result.exit_code == 2
    assert result.stderr.startswith("vpnctl: build/ does not match inventory.yaml and keystore/ (")
    assert "build/alpha/etc/vpnd/ba.conf" in result.stderr
    assert result.stderr.endswith("; run `vpnctl render` first\n")


# ---- 3. a recap per host, never "no changes" after a failure ---------------------------------


def test_dry_run_to_unreachable_hosts_ends_with_a_recap_not_no_changes(closed: Path) -> None:
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    result = run("deploy", "--dry-run", "--all", "-j", "1")
    assert result.exit_code == 1
    refused = "ssh: connect to host 127.0.0.1 port 1: Connection refused"
    assert result.stdout == (
        f"[1/2] alpha        FAILED probe: unreachable: {refused}\n"
        f"[2/2] beta         FAILED probe: unreachable: {refused}\n"
        "\n"
        "RECAP (dry run: nothing was changed)\n"
        f"alpha  unreachable  {refused}\n"
        f"beta   unreachable  {refused}\n"
        "2 host(s): 0 ok, 0 changed, 0 failed, 2 unreachable\n"
    )
    assert "no changes" not in result.output


def test_recap_sorts_each_host_into_ok_changed_failed_unreachable() -> None:
    from vpnctl.commands.deploy import format_recap, recap
    from vpnctl.deploy import DeployReport, HostOutcome, HostPlan

    def plan(host: str, changed: dict[str, list[str]]) -> HostPlan:
        return HostPlan(host, False, False, changed, [], [], [], [], {})

    outcomes = {
        "alpha": HostOutcome("alpha", plan("alpha", {}), None),
        "beta": HostOutcome("beta", plan("beta", {"ab": ["config changed"]}), confirmed=["ab"]),
        "gamma": HostOutcome(
            "gamma", plan("gamma", {"cd": ["new key"]}), rolled_back={"cd": "not up within 3s"}
        ),
        "delta": HostOutcome("delta", None, "delta: unreachable: ssh: timed out", unreachable=True),
        "eps": HostOutcome("eps", None, "eps: python3 not found on the host"),
    }
    text = format_recap(recap(DeployReport(outcomes), dry_run=False), dry_run=False)
    assert text == (
        "\n"
        "RECAP\n"
        "alpha  ok\n"
        "beta   changed      ab confirmed\n"
        "gamma  failed       cd rolled back\n"
        "delta  unreachable  ssh: timed out\n"
        "eps    failed       python3 not found on the host\n"
        "5 host(s): 1 ok, 1 changed, 2 failed, 1 unreachable\n"
    )


# ---- 8. messages -----------------------------------------------------------------------------


def test_a_yaml_syntax_error_shows_the_line_a_caret_and_the_tab_hint(project: Path) -> None:
    (project / "inventory.yaml").write_text("version: 1\nhosts:\n\t- name: a\n")
    result = run("keys")
    assert result.exit_code == 2
    assert result.stderr == (
        "inventory.yaml:3: not valid YAML: found character '\\t' that cannot start any token\n"
        "   - name: a\n"
        "  ^\n"
        "  hint: this line holds a tab; YAML indents with spaces only\n"
    )


def test_a_yaml_error_without_a_tab_shows_the_line_and_caret(project: Path) -> None:
    (project / "inventory.yaml").write_text("version: 1\nhosts: [a, b\nlinks: []\n")
    result = run("keys")
    assert result.exit_code == 2
    assert result.stderr == (
        "inventory.yaml:3: not valid YAML: expected ',' or ']', but got ':'\n"
        "  links: []\n"
        "       ^\n"
    )


def test_netmask_and_wrong_family_messages_say_what_to_write(project: Path) -> None:
    inventory = project / "inventory.yaml"
    text = inventory.read_text()
    text = text.replace("        - 198.18.30.0/24", "        - 198.18.30.0 255.255.255.0")
    text = text.replace("      - 198.18.10.0/24", "      - 2001:db8::/32")
    text = text.replace("    address: 198.18.1.2", "    address: 2001:db8::2")
    inventory.write_text(text)
    result = run("keys")
    assert result.exit_code == 2
    assert result.stderr == (
        "inventory.yaml:112 hosts[1].address: expected an IPv4 address like 198.18.1.1, got "
        "'2001:db8::2'; this field takes an IPv4 address, 2001:db8::2 is IPv6\n"
        "inventory.yaml:144 links[0].routes.server[0]: expected a network like 198.18.10.0/24, "
        "got '2001:db8::/32'; this field takes an IPv4 network, 2001:db8::/32 is IPv6\n"
        "inventory.yaml:167 links[1].routes.client[0]: expected a network like 198.18.10.0/24, "
        "got '198.18.30.0 255.255.255.0'; write 198.18.30.0/24\n"
    )


def test_deploy_and_status_to_an_unknown_host_list_the_known_hosts(project: Path) -> None:
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    for command in ("deploy", "status"):
        result = run(command, "nosuch")
        assert result.exit_code == 2, command
        assert result.stdout == ""
        assert result.stderr == (
            "vpnctl: inventory.yaml: no host named nosuch; the hosts are: alpha, beta, gamma\n"
        ), command


def test_a_second_rotate_says_how_to_promote_or_discard(project: Path) -> None:
    assert run("keygen").exit_code == 0
    assert run("keygen", "--rotate", "lab").exit_code == 0
    staged = json.loads((project / "keystore/lab.next.meta.json").read_text())["fingerprint"]
    result = run("keygen", "--rotate", "lab")
    assert result.exit_code == 2
    assert result.stderr == (
        f"vpnctl: keystore/lab.next.key: 'lab' already has a staged key ({staged}); make it "
        "current with `vpnctl keygen --promote lab`, or discard it with "
        "`rm keystore/lab.next.*` and rotate again\n"
    )
