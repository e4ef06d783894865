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
    lines = text.splitlines()

    def line(needle: str) -> int:  # the example inventory grows: find, don't hard-code
        return next(i for i, t in enumerate(lines, 1) if needle in t)

    result = run("keys")
    assert result.exit_code == 2
    assert result.stderr == (
        f"inventory.yaml:{line('    address: 2001:db8::2')} hosts[1].address: expected an IPv4 "
        "address like 198.18.1.1, got "
        "'2001:db8::2'; this field takes an IPv4 address, 2001:db8::2 is IPv6\n"
        f"inventory.yaml:{line('      - 2001:db8::/32')} links[0].routes.server[0]: expected a "
        "network like 198.18.10.0/24, "
        "got '2001:db8::/32'; this field takes an IPv4 network, 2001:db8::/32 is IPv6\n"
        f"inventory.yaml:{line('        - 198.18.30.0 255')} links[1].routes.client[0]: expected "
        "a network like 198.18.10.0/24, "
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


# ---- 6. status that reads at a glance --------------------------------------------------------


def _fleet() -> object:
    from vpnctl.fleetstatus import EndStatus, FleetStatus, LinkStatus

    def end(host: str, role: str, state: str, **kw: object) -> EndStatus:
        return EndStatus(host, "office", role, state, **kw)  # type: ignore[arg-type]

    up: dict[str, object] = {
        "peer": "198.18.1.2:41234",
        "uptime": 3725.2,
        "last_rtt": 0.00299923,
        "bytes_in": 123456789,
        "bytes_out": 98765,
        "key_fingerprint": "ab12:cd34:ef56:7890",
        "key_age": 90061.0,
    }
    office = LinkStatus("office", True, "up", [end("alpha", "server", "up", **up),
                                                end("beta", "client", "up", **up)])  # fmt: skip
    lab = LinkStatus(
        "lab",
        False,
        "alpha: connecting, no answer from peer; gamma: unreachable",
        [
            EndStatus("alpha", "lab", "server", "connecting", "no answer from peer"),
            EndStatus("gamma", "lab", "client", "unreachable", "ssh: Could not resolve hostname"),
        ],
    )
    return FleetStatus([office, lab], {"gamma": "ssh: Could not resolve hostname"}, 2.99923)


WIDE_TABLE = (
    "LINK    VERDICT  HOST   ROLE    STATE        PEER              UPTIME  RTT    IN      OUT    "
    "KEY                  KEY AGE\n"
    "office  UP       alpha  server  up           198.18.1.2:41234  1h 2m   3.0ms  117.7M  96.5K  "
    "ab12:cd34:ef56:7890  1d 1h\n"
    "                 beta   client  up           198.18.1.2:41234  1h 2m   3.0ms  117.7M  96.5K  "
    "ab12:cd34:ef56:7890  1d 1h\n"
    "lab     DOWN     alpha  server  connecting   -                 -       -      -       -      -"
    "                    -\n"
    "                 gamma  client  unreachable  -                 -       -      -       -      -"
    "                    -\n"
)
FOOTER = (
    "\n"
    "DOWN lab: alpha: connecting, no answer from peer; gamma: unreachable\n"
    "UNREACHABLE gamma: ssh: Could not resolve hostname\n"
    "1/2 link(s) up (3.0s)\n"
)


def test_status_at_200_columns_shows_every_column_and_each_failure_once() -> None:
    from vpnctl.fleetstatus import format_table

    text = format_table(_fleet(), width=200)  # type: ignore[arg-type]
    assert text == WIDE_TABLE + FOOTER
    assert text.count("Could not resolve") == 1


def test_status_at_80_columns_drops_columns_by_priority_and_wraps() -> None:
    from vpnctl.fleetstatus import format_table

    text = format_table(_fleet(), width=80)  # type: ignore[arg-type]
    assert text == (
        "LINK    VERDICT  HOST   STATE        UPTIME  RTT    IN      OUT\n"
        "office  UP       alpha  up           1h 2m   3.0ms  117.7M  96.5K\n"
        "                 beta   up           1h 2m   3.0ms  117.7M  96.5K\n"
        "lab     DOWN     alpha  connecting   -       -      -       -\n"
        "                 gamma  unreachable  -       -      -       -\n"
        "\n"
        "DOWN lab: alpha: connecting, no answer from peer; gamma: unreachable\n"
        "UNREACHABLE gamma: ssh: Could not resolve hostname\n"
        "1/2 link(s) up (3.0s)\n"
        "(not shown to fit 80 columns: PEER, KEY AGE, ROLE, KEY; --wide shows all)\n"
    )
    narrow = format_table(_fleet(), width=50)  # type: ignore[arg-type]
    assert narrow == (
        "LINK    VERDICT  HOST   STATE        UPTIME  RTT\n"
        "office  UP       alpha  up           1h 2m   3.0ms\n"
        "                 beta   up           1h 2m   3.0ms\n"
        "lab     DOWN     alpha  connecting   -       -\n"
        "                 gamma  unreachable  -       -\n"
        "\n"
        "DOWN lab: alpha: connecting, no answer from peer;\n"
        "  gamma: unreachable\n"
        "UNREACHABLE gamma: ssh: Could not resolve hostname\n"
        "1/2 link(s) up (3.0s)\n"
        "(not shown to fit 50 columns: PEER, KEY AGE, ROLE,\n"
        "  KEY, IN, OUT; --wide shows all)\n"
    )


def test_status_colours_only_when_asked_and_honours_no_color(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vpnctl.commands.status import use_color
    from vpnctl.fleetstatus import format_table

    painted = format_table(_fleet(), width=200, color=True)  # type: ignore[arg-type]
    assert "\x1b[32mUP\x1b[0m" in painted and "\x1b[31mDOWN\x1b[0m" in painted
    assert "\x1b" not in format_table(_fleet(), width=200)  # type: ignore[arg-type]

    class Tty:
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color(Tty())  # type: ignore[arg-type]
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color(Tty())  # type: ignore[arg-type]


def test_status_of_unreachable_hosts_through_the_cli_says_each_failure_once(
    closed: Path,
) -> None:
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    result = run("status", "-j", "1", env={"COLUMNS": "80"})
    assert result.exit_code == 1
    refused = "ssh: connect to host 127.0.0.1 port 1: Connection refused"
    lines = result.stdout.splitlines()
    assert lines[:6] == [
        "LINK  VERDICT  HOST   ROLE    STATE        UPTIME  RTT  IN  OUT  KEY  KEY AGE",
        "ab    DOWN     alpha  server  unreachable  -       -    -   -    -    -",
        "               beta   client  unreachable  -       -    -   -    -    -",
        "",
        "DOWN ab: alpha: unreachable; beta: unreachable",
        f"UNREACHABLE alpha: {refused}",
    ]
    assert lines[6] == f"UNREACHABLE beta: {refused}"
    assert lines[7].startswith("0/1 link(s) up (") and lines[7].endswith("s)")
    assert lines[8:] == ["(not shown to fit 80 columns: PEER; --wide shows all)"]
    assert result.stdout.count("Connection refused") == 2  # once per host, nowhere else
    wide = run("status", "--wide", env={"COLUMNS": "80"})
    assert wide.stdout.splitlines()[0].split("  ")[-1] == "KEY AGE"
    assert "PEER" in wide.stdout.splitlines()[0]


def _pty_run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run the real vpnctl on a pseudo-terminal (stdin, stdout and stderr) and return all it
    wrote there."""
    import pty
    import subprocess
    import sys

    main, sub = pty.openpty()
    vpnctl = str(Path(sys.executable).with_name("vpnctl"))
    proc = subprocess.Popen([vpnctl, *args], cwd=cwd, env=env, stdin=sub, stdout=sub,
                            stderr=sub, close_fds=True)  # fmt: skip
    os.close(sub)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: the child closed its side
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(main)
    return b"".join(chunks).decode(errors="replace")


def test_on_a_terminal_status_is_coloured_unless_no_color(closed: Path) -> None:
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    env = {k: v for k, v in os.environ.items() if k not in {"NO_COLOR", "COLUMNS"}}
    env["COLUMNS"] = "200"
    painted = _pty_run(["status", "-j", "1"], closed, env)
    assert "\x1b[31mDOWN\x1b[0m" in painted
    # drawn live as hosts answer: after alpha, beta is still being asked; then redrawn in place
    live, final = painted.split("\x1b[J", 1)[0], painted.rsplit("\x1b[J", 1)[1]
    assert "beta   client  \x1b[33masking\x1b[0m" in live
    assert "DOWN ab: alpha: unreachable; beta: asking" in live
    assert "asking" not in final and "UNREACHABLE beta:" in final
    plain = _pty_run(["status"], closed, {**env, "NO_COLOR": "1"})
    assert "DOWN" in plain and "\x1b[31m" not in plain and "\x1b[32m" not in plain


def test_deploy_without_a_passphrase_option_prompts_only_on_a_terminal(closed: Path) -> None:
    assert run("keygen", "--passphrase-env", "PW", env={"PW": "right"}).exit_code == 0
    assert run("render").exit_code == 0
    # on a terminal it asks (nobody answers here: the test ends the process once it asked)
    import pty
    import select
    import subprocess
    import sys

    main, sub = pty.openpty()
    vpnctl = str(Path(sys.executable).with_name("vpnctl"))
    proc = subprocess.Popen([vpnctl, "deploy", "--dry-run", "--all"], cwd=closed,
                            stdin=sub, stdout=sub, stderr=sub, close_fds=True)  # fmt: skip
    os.close(sub)
    seen = b""
    try:
        from tests.helpers.wait import poll_until

        def prompted() -> bool:
            nonlocal seen
            if select.select([main], [], [], 0.2)[0]:
                seen += os.read(main, 4096)
            return b"Keystore passphrase" in seen

        poll_until(prompted, timeout=30)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        os.close(main)
    assert b"Keystore passphrase" in seen


# ---- 11. strings from hosts are data ---------------------------------------------------------

ESC_STATE = "up\x1b]0;owned\x07"
HOSTILE = {
    "state": "up",
    "reason": "\x1b[2J\x1b[Hcleared your screen",
    "peer": "198.18.1.2:5\x1b[31m",
    "since": 1000.0,
    "updated": 1100.0,
    "pid": 7,
    "key_fingerprint": "ab12:cd34:ef56:7890\u202e",
    "bytes_in": 1,
    "bytes_out": 2,
    "last_rtt": 0.001,
}


def _status_text(record: object, *, keymtime: str = "100", now: str = "1100.5") -> str:
    line = record if isinstance(record, str) else json.dumps(record)
    return f"{now}\n@@vpnctl l1\nconfig yes\nalive yes\n{line}\nkeymtime {keymtime}\npidfile 7\n"


def _manifest() -> dict:
    prefix = "/srv/h1"
    return {"host": "h1", "prefix": prefix, "links": {"l1": {
        "role": "server", "peer": "h2", "config": f"{prefix}/l1.conf",
        "keyfile": f"{prefix}/l1.key", "pidfile": f"{prefix}/l1.pid",
        "statusfile": f"{prefix}/l1.json", "key_fingerprint": "ab12:cd34:ef56:7890"}}}  # fmt: skip


def test_escape_sequences_from_a_host_are_shown_as_escapes_never_raw() -> None:
    from vpnctl.deploy import parse_status_output
    from vpnctl.fleetstatus import end_row, parse_host_output

    record = parse_status_output(_status_text(HOSTILE))["l1"].record
    assert record is not None
    assert record["peer"] == "198.18.1.2:5\\x1b[31m"
    assert record["key_fingerprint"] == "ab12:cd34:ef56:7890\\u202e"
    (end,) = parse_host_output("h1", _manifest(), _status_text(HOSTILE))
    row = end_row(end)
    assert row["PEER"] == "198.18.1.2:5\\x1b[31m"
    assert not any("\x1b" in cell or "\u202e" in cell for cell in row.values())


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({**HOSTILE, "last_rtt": "fast"}, "field 'last_rtt' is 'fast', not a number"),
        ({**HOSTILE, "state": 7}, "field 'state' is 7, not a string"),
        ({**HOSTILE, "bytes_in": True}, "field 'bytes_in' is True, not an integer"),
        ({**HOSTILE, "drops": {"x": "y"}}, "field 'drops' is not a mapping of counts"),
        ([1, 2], "the status record is list, not a JSON object"),
        ('{"state": "up", "pid', "the status record is not JSON (cut short?)"),
        ({**HOSTILE, "reason": ["\x1b[2J"]}, "field 'reason' is ['\\x1b[2J'], not a string"),
    ],
)
def test_a_malformed_record_is_that_hosts_error(record: object, problem: str) -> None:
    from vpnctl.fleetstatus import MalformedAnswer, parse_host_output

    with pytest.raises(MalformedAnswer) as caught:
        parse_host_output("h1", _manifest(), _status_text(record))
    assert str(caught.value) == f"link l1: malformed answer: {problem}"


def test_a_truncated_answer_is_that_hosts_error() -> None:
    from vpnctl.fleetstatus import MalformedAnswer, parse_host_output

    with pytest.raises(MalformedAnswer, match=r"^answer cut short: nothing about link\(s\) l1$"):
        parse_host_output("h1", _manifest(), "1100.5\n")


def test_bad_numbers_from_a_host_never_raise() -> None:
    from vpnctl.deploy import parse_status_output

    read = parse_status_output(_status_text(HOSTILE, keymtime="12x\x1b", now="nan"))["l1"]
    assert read.key_mtime is None
    assert read.now > 1e9  # the host's clock was not a number: ours is used


class HostileHost:
    """An ssh host whose status script answer is chosen per host name: the transport is
    replaced, every byte of the answer goes through the real parser and table."""

    answers: dict[str, str] = {}

    def __init__(self, name: str, *_: object, **__: object) -> None:
        self.name = name

    def run(self, command: str, **_: object) -> object:
        from vpnctl.ssh import RemoteResult

        return RemoteResult(0, HostileHost.answers[self.name].encode(), b"")


def test_status_shows_a_hostile_host_as_its_own_error_line(
    closed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from vpnctl import fleetstatus

    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    now = time.time()
    good = {**HOSTILE, "reason": None, "updated": now, "since": now - 5}
    good["key_fingerprint"] = fp(closed, "ab")

    def answer(record: object) -> str:
        return _status_text(record, now=str(now)).replace("@@vpnctl l1", "@@vpnctl ab")

    HostileHost.answers = {
        "alpha": answer(good),
        "beta": answer({**good, "bytes_out": "lots\x1b[5m"}),
    }
    monkeypatch.setattr(fleetstatus, "SshHost", HostileHost)
    result = run("status", "--wide")
    assert result.exit_code == 1
    assert "\x1b" not in result.stdout
    lines = result.stdout.splitlines()
    assert lines[2].split() == ["beta", "client", "bad", "answer"] + ["-"] * 7
    assert lines[4:6] == [
        "DOWN ab: beta: bad answer",
        "BAD ANSWER beta: link ab: malformed answer: field 'bytes_out' is 'lots\\x1b[5m', not "
        "an integer",
    ]
    assert lines[1].split()[:6] == ["ab", "DOWN", "alpha", "server", "up", "198.18.1.2:5\\x1b[31m"]
    doc = json.loads(run("status", "--json").stdout)
    assert doc["bad_answers"] == {"beta": lines[5].removeprefix("BAD ANSWER beta: ")}


def test_a_bad_answer_during_confirm_fails_the_link_so_it_is_rolled_back() -> None:
    from vpnctl.deploy import confirm_links

    class Host:
        def __init__(self, text: str) -> None:
            self.text = text

        def run(self, command: str, **_: object) -> object:
            from vpnctl.ssh import RemoteResult

            return RemoteResult(0, self.text.encode(), b"")

    manifest = _manifest()
    ssh = {
        "h1": Host(_status_text({**HOSTILE, "last_rtt": "x"}, keymtime="\x1b[2Jx")),
        "h2": Host(_status_text(HOSTILE, keymtime="nan")),
    }
    results = confirm_links({"l1": ["h1", "h2"]}, {"l1": "ab12:cd34:ef56:7890"}, ssh,  # type: ignore[arg-type]
                            {"h1": manifest, "h2": manifest}, wait=0, jobs=2)  # fmt: skip
    state, why = results["l1"]
    assert state == "failed"
    assert "h1: bad answer (malformed answer: field 'last_rtt' is 'x', not a number)" in why


# ---- 7. scriptable everywhere ----------------------------------------------------------------


def _valid(name: str, text: str) -> dict:
    import jsonschema

    schema = json.loads((REPO / "docs" / "json" / f"{name}.schema.json").read_text())
    doc = json.loads(text)
    jsonschema.validate(doc, schema)
    return doc


def test_every_json_document_matches_its_schema(closed: Path) -> None:
    keygen = run("keygen", "--json")
    assert keygen.exit_code == 0
    doc = _valid("keygen", keygen.stdout)
    assert doc["keys"] == [
        {"link": "ab", "action": "created", "fingerprint": fp(closed, "ab"), "encrypted": False}
    ]
    assert _valid("keygen", run("keygen", "--json").stdout)["keys"][0]["action"] == "kept"
    staged = _valid("keygen", run("keygen", "--rotate", "ab", "--json").stdout)
    assert staged["keys"][0]["action"] == "staged"
    keys = run("keys", "--json")
    assert keys.exit_code == 0
    _valid("keys", keys.stdout)
    render = run("render", "--json")
    assert render.exit_code == 0
    doc = _valid("render", render.stdout)
    assert {c["path"] for c in doc["changes"]} >= {"alpha/manifest.json", "beta/etc/vpnd/ab.conf"}
    check = run("render", "--check", "--json")
    assert check.exit_code == 0
    assert _valid("render", check.stdout)["ok"] is True
    diff = run("render", "--diff", "--json")
    assert diff.exit_code == 0
    assert _valid("render", diff.stdout) == {
        "version": 1,
        "build": "build",
        "changed": [],
        "diff": "",
    }
    dry = run("deploy", "--dry-run", "--all", "--json", "-j", "1")
    assert dry.exit_code == 1
    doc = _valid("deploy", dry.stdout)
    assert [(h["host"], h["result"]) for h in doc["hosts"]] == [
        ("alpha", "unreachable"),
        ("beta", "unreachable"),
    ]
    assert "FAILED probe" in dry.stderr and "FAILED probe" not in dry.stdout
    status = run("status", "--json")
    assert status.exit_code == 1
    doc = _valid("status", status.stdout)
    assert sorted(doc["unreachable"]) == ["alpha", "beta"]


def test_deploy_json_of_a_plan_matches_the_schema() -> None:
    from vpnctl.commands.deploy import deploy_json
    from vpnctl.deploy import DeployReport, HostOutcome, HostPlan

    plan = HostPlan("alpha", False, True, {"ab": ["config changed"]}, ["cd"], [], ["ef"], [], {})
    report = DeployReport({"alpha": HostOutcome("alpha", plan)}, diff="--- a\n+++ b\n")
    doc = deploy_json(report, dry_run=True)
    _valid("deploy", json.dumps(doc))
    assert doc["hosts"][0]["plan"] == {
        "runtime": True, "changed": {"ab": ["config changed"]}, "start": ["cd"],
        "removed": [], "unchanged": ["ef"],
    }  # fmt: skip
    assert doc["hosts"][0]["detail"] == "would (re)start ab, cd"


def test_version_completion_and_global_options_after_the_command(project: Path) -> None:
    from importlib.metadata import version

    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout == f"vpnctl {version('vpnctl')}\n"
    assert "--install-completion" in run("--help").stdout
    assert run("keygen").exit_code == 0
    (project / "other").mkdir()
    os.rename(project / "inventory.yaml", project / "other" / "inv.yaml")
    os.rename(project / "keystore", project / "other" / "keystore")

    def fingerprints(*args: str) -> list[str]:
        result = run(*args)
        assert result.exit_code == 0, result.output
        return [row["fingerprint"] for row in json.loads(result.stdout)["links"]]

    expected = [fp(project / "other", "office"), fp(project / "other", "lab")]
    assert fingerprints("-i", "other/inv.yaml", "keys", "--json") == expected
    assert fingerprints("keys", "-i", "other/inv.yaml", "--json") == expected
    assert fingerprints("keys", "--json", "--inventory=other/inv.yaml") == expected
    assert run("render", "--check", "-i", "other/inv.yaml").exit_code == 1  # not rendered yet
    # after `--` an -i is an argument, not the global option
    assert run("deploy", "--", "-i").exit_code == 2


# ---- 9. vpnd --check --no-key, used by render -------------------------------------------------


def _vpnd(*args: str, cwd: Path) -> tuple[int, str, str]:
    import subprocess
    import sys

    proc = subprocess.run([str(Path(sys.executable).with_name("vpnd")), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


def test_vpnd_checks_a_rendered_config_whose_key_is_not_there(closed: Path) -> None:
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    conf = "build/beta/etc/vpnd/ab.conf"
    code, out, err = _vpnd("--check", "-f", conf, cwd=closed)
    assert code == 2
    assert err == "/etc/vpnd/ab.key: cannot open key file: No such file or directory\n"
    code, out, err = _vpnd("--check", "--no-key", "-f", conf, cwd=closed)
    assert (code, err) == (0, "")
    assert out.startswith(f"{conf}: OK (mode client, 198.18.1.1:379, ")
    assert out.endswith(", key /etc/vpnd/ab.key not checked (--no-key))\n")
    code, out, err = _vpnd("--no-key", "-f", conf, cwd=closed)
    assert code == 2
    assert err.endswith("vpnd: error: --no-key goes with --check\n")


def test_render_check_runs_vpnd_check_no_key_on_every_config(closed: Path) -> None:
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    conf = closed / "build/alpha/etc/vpnd/ab.conf"
    conf.write_text(conf.read_text().replace("mode server", "mode sever"))
    check = run("render", "--check")
    assert check.exit_code == 1
    refusal = [line for line in check.stdout.splitlines() if "vpnd --check --no-key" in line]
    assert refusal == [
        "FAIL  vpnd --check --no-key: build/alpha/etc/vpnd/ab.conf:3: mode: must be 'client' "
        "or 'server', got 'sever'"
    ]


# ---- 10. metrics -----------------------------------------------------------------------------


def _promtool(text: str) -> None:
    """`promtool check metrics` (Debian's prometheus package) must accept `text`."""
    import subprocess

    from tests.conftest import require_tools

    require_tools("promtool")
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout + proc.stderr == ""


def test_vpnd_writes_a_node_exporter_textfile_that_promtool_accepts(closed: Path) -> None:
    import time

    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    now = time.time()
    record = {**HOSTILE, "pid": os.getpid(), "updated": now, "since": now - 60,
              "packets_in": 3, "packets_out": 4, "carrier_bytes_in": 50,
              "carrier_bytes_out": 60, "rekeys": 2, "reconnects": 1, "missed_keepalives": 0,
              "session_age": 59.5, "drops": {"auth": 2}, "mode": "server",
              "interface": 'vpn-"ab"\\'}  # fmt: skip
    (closed / "ab.status.json").write_text(json.dumps(record))
    confs = []
    for host in ("alpha", "beta"):
        text = (closed / f"build/{host}/etc/vpnd/ab.conf").read_text()
        conf = closed / f"{host}-ab.conf"
        status = closed / ("ab.status.json" if host == "alpha" else "none.json")
        conf.write_text(text.replace("/run/vpnd/ab.status.json", str(status)))
        confs += ["-f", str(conf)]
    out = closed / "textfile" / "vpnd.prom"
    out.parent.mkdir()
    code, stdout, stderr = _vpnd("status", "--prometheus", *confs, "--textfile", str(out),
                                 cwd=closed)  # fmt: skip
    assert (code, stdout, stderr) == (0, "", "")
    assert os.listdir(out.parent) == ["vpnd.prom"]  # written atomically, no temp file left
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    text = out.read_text()
    _promtool(text)
    lines = text.splitlines()
    assert 'vpnd_up{link="alpha-ab"} 1' in lines
    assert 'vpnd_up{link="beta-ab"} 0' in lines
    assert 'vpnd_state{link="beta-ab",state="not running"} 1' in lines
    assert 'vpnd_tunnel_bytes_total{link="alpha-ab",direction="in"} 1' in lines
    assert 'vpnd_drops_total{link="alpha-ab",reason="auth"} 2' in lines
    assert 'vpnd_keepalive_rtt_seconds{link="alpha-ab"} 0.001' in lines
    assert lines.count("# TYPE vpnd_tunnel_bytes_total counter") == 1
    info = next(line for line in lines if line.startswith("vpnd_info"))
    assert 'interface="vpn-\\"ab\\"\\\\"' in info
    code, stdout, _ = _vpnd("status", "--prometheus", *confs, cwd=closed)
    assert code == 0 and stdout == text


def test_vpnctl_status_prometheus_covers_the_fleet_and_promtool_accepts_it(
    closed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from vpnctl import fleetstatus

    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    now = time.time()
    good = {**HOSTILE, "updated": now, "since": now - 5, "key_fingerprint": fp(closed, "ab")}

    def answer(record: object) -> str:
        return _status_text(record, now=str(now)).replace("@@vpnctl l1", "@@vpnctl ab")

    HostileHost.answers = {"alpha": answer(good), "beta": answer({**good, "pid": "x"})}
    monkeypatch.setattr(fleetstatus, "SshHost", HostileHost)
    result = run("status", "--prometheus")
    assert result.exit_code == 0
    _promtool(result.stdout)
    lines = result.stdout.splitlines()
    assert 'vpnd_up{host="alpha",link="ab",role="server"} 1' in lines
    assert 'vpnd_state{host="beta",link="ab",role="client",state="bad answer"}' not in lines
    assert 'vpnd_up{host="beta",link="ab",role="client"} 0' in lines
    assert 'vpnctl_host_answered{host="alpha"} 1' in lines
    assert 'vpnctl_host_answered{host="beta"} 0' in lines
    assert 'vpnctl_link_up{link="ab"} 0' in lines
    assert "\x1b" not in result.stdout
    both = run("status", "--prometheus", "--json")
    assert (both.exit_code, both.stderr) == (
        2,
        "vpnctl: give either --json or --prometheus, not both\n",
    )


def test_hoisting_global_options_skips_their_values_and_stops_at_double_dash() -> None:
    from vpnctl.cli import hoist_global_options

    commands = ["keys", "status", "render", "deploy"]
    assert hoist_global_options(["-i", "status", "keys", "--build", "b"], commands) == [
        "--build", "b", "-i", "status", "keys"
    ]  # fmt: skip
    assert hoist_global_options(["deploy", "a", "-i", "x.yaml", "--", "-i"], commands) == [
        "-i", "x.yaml", "deploy", "a", "--", "-i"
    ]  # fmt: skip
    assert hoist_global_options(["render", "--keystore=ks"], commands) == [
        "--keystore=ks", "render"
    ]  # fmt: skip
