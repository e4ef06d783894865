"""Deploy planning for hubs (pure): a change only in the peers directory reloads the hub, a
removed client's peer file and key are pruned, anything else restarts it."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vpnctl.cli import app
from vpnctl.deploy import (
    HostPlan,
    RemoteState,
    _confirm_units,
    _peer_record,
    apply_script,
    desired_files,
    load_manifest,
    plan_host,
    rollback_script,
)
from vpnctl.keystore import Keystore

INVENTORY = """\
hosts:
  - {name: alpha, address: 198.18.1.1, systemd: false}
  - {name: beta, address: 198.18.1.2, systemd: false}
  - {name: gamma, address: 198.18.1.3, systemd: false}
  - {name: delta, address: 198.18.1.4, systemd: false}
hubs:
  - name: branches
    server: alpha
    network: 198.19.50.0/24
    clients: [CLIENTS]
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for var in ("VPNCTL_INVENTORY", "VPNCTL_KEYSTORE", "VPNCTL_BUILD"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def render(project: Path, clients: str, **replace: str) -> dict:
    text = INVENTORY.replace("CLIENTS", clients)
    for old, new in replace.items():
        text = text.replace(old, new)
    (project / "inventory.yaml").write_text(textwrap.dedent(text))
    for command in ("keygen", "render"):
        result = CliRunner().invoke(app, [command])
        assert result.exit_code == 0, result.output
    return load_manifest(project / "build", "alpha")


def deployed_state(project: Path, manifest: dict, *, running: bool = True) -> RemoteState:
    """A host on which `manifest` is deployed exactly and its daemons run."""
    files = desired_files(project / "build", manifest, Keystore(project / "keystore"),
                          use_systemd=False)  # fmt: skip
    return RemoteState(
        stamp="s",
        systemd_running=False,
        python="/usr/bin/python3",
        files={f.path: (f.sha256, f.mode) for f in files},
        running=dict.fromkeys(manifest["links"], running),
        deployed=manifest,
        uid=0,
    )


def plan(project: Path, manifest: dict, remote: RemoteState) -> HostPlan:
    files = desired_files(project / "build", manifest, Keystore(project / "keystore"),
                          use_systemd=False)  # fmt: skip
    return plan_host("alpha", manifest, files, remote, runtime_stamp="s", use_systemd=False)


def test_the_same_hub_again_is_a_noop(project: Path) -> None:
    manifest = render(project, "beta, gamma")
    result = plan(project, manifest, deployed_state(project, manifest))
    assert result.noop
    assert result.unchanged == ["branches"]


def test_an_added_client_reloads_the_hub_and_writes_only_its_peer_file_and_key(
    project: Path,
) -> None:
    before = render(project, "beta, gamma")
    remote = deployed_state(project, before)
    after = render(project, "beta, gamma, delta")
    result = plan(project, after, remote)
    assert result.changed == {}
    assert result.restarts == []
    assert result.reload == {"branches": ["client delta added"]}
    assert sorted((f.kind, f.path) for f in result.files) == [
        ("peer", "/etc/vpnd/branches.peers/delta.peer"),
        ("peerkey", "/etc/vpnd/branches.peers/delta.key"),
    ]
    assert result.touched_clients["branches"] == ["delta"]
    script = apply_script(result, after, before)
    assert "kill -HUP" in script
    assert "kill -TERM" not in script and "--daemon" not in script
    units = _confirm_units("alpha", after, "branches", result)
    assert [(unit, ends, nxt) for unit, ends, _, nxt in units] == [
        ("branches/delta", ["alpha", "delta"], None)
    ]


def test_a_removed_client_is_pruned_and_the_hub_reloaded(project: Path) -> None:
    before = render(project, "beta, gamma")
    remote = deployed_state(project, before)
    after = render(project, "beta")
    result = plan(project, after, remote)
    assert result.changed == {}
    assert result.reload == {"branches": ["client gamma removed"]}
    assert result.prune == {
        "branches": ["/etc/vpnd/branches.peers/gamma.peer", "/etc/vpnd/branches.peers/gamma.key"]
    }
    script = apply_script(result, after, before)
    assert "rm -f /etc/vpnd/branches.peers/gamma.peer\n" in script
    assert "rm -f /etc/vpnd/branches.peers/gamma.key\n" in script
    # the pruned files are backed up first, and a rollback restores them and reloads again
    assert script.index("/var/lib/vpnctl/prev/files/etc/vpnd/branches.peers/gamma.key") < (
        script.index("rm -f /etc/vpnd/branches.peers/gamma.key")
    )
    back = rollback_script(result, after, ["branches"], runtime_back=False)
    assert "branches.peers/gamma.key" in back
    assert "kill -HUP" in back and "--daemon" not in back


def test_a_change_to_the_hub_config_restarts_it(project: Path) -> None:
    before = render(project, "beta, gamma")
    remote = deployed_state(project, before)
    after = render(project, "beta, gamma, delta", **{"    network:": "    port: 390\n    network:"})
    result = plan(project, after, remote)
    assert result.reload == {}
    assert result.changed["branches"][0] == "config changed"
    assert result.restarts == ["branches"]
    units = [u for u, _, _, _ in _confirm_units("alpha", after, "branches", result)]
    assert units == ["branches/beta", "branches/delta", "branches/gamma"]


def test_a_hub_that_is_not_running_is_started_not_reloaded(project: Path) -> None:
    before = render(project, "beta, gamma")
    remote = deployed_state(project, before, running=False)
    after = render(project, "beta, gamma, delta")
    result = plan(project, after, remote)
    assert result.reload == {}
    assert result.restarts == ["branches"]


def test_a_hub_client_is_judged_from_the_hubs_peers_entry() -> None:
    record = {
        "state": "up",
        "pid": 7,
        "peers": [
            {"name": "beta", "state": "up", "session_started": 100.0, "since": 90.0,
             "key_fingerprint": "ab", "reason": None, "peer": "198.18.1.2:4000",
             "session_age": 5.0, "last_rtt": 0.001, "bytes_in": 1, "bytes_out": 2},
        ],
    }  # fmt: skip
    beta = _peer_record(record, "beta")
    assert beta is not None
    assert (beta["state"], beta["since"], beta["key_fingerprint"]) == ("up", 100.0, "ab")
    assert _peer_record(record, "gamma") == {
        "state": "down",
        "reason": "the hub lists no client 'gamma' in peers[]",
    }
    gone = {"state": "not running", "reason": "daemon gone"}
    assert _peer_record(gone, "beta") is gone


def test_status_shows_a_hub_as_one_block_with_a_row_per_client(project: Path) -> None:
    from vpnctl.fleetstatus import FleetStatus, _judge, format_table, parse_host_output

    hub_manifest = render(project, "beta, gamma")
    beta_manifest = load_manifest(project / "build", "beta")
    gamma_manifest = load_manifest(project / "build", "gamma")
    fps = {c: hub_manifest["links"]["branches"]["clients"][c]["key_fingerprint"]
           for c in ("beta", "gamma")}  # fmt: skip
    now = 1000.0

    def output(link: str, record: dict) -> str:
        record = {"pid": 7, "updated": now, **record}
        return (f"{now}\n@@vpnctl {link}\nconfig yes\nalive yes\n"
                f"{json.dumps(record)}\nkeymtime {now - 60}\npidfile 7\n")  # fmt: skip

    hub = output("branches", {"state": "up", "hub": True, "peers": [
        {"name": "beta", "state": "up", "session_started": now - 30, "session_age": 30.0,
         "since": now - 30, "key_fingerprint": fps["beta"], "peer": "198.18.1.2:40000",
         "last_rtt": 0.0012, "bytes_in": 2048, "bytes_out": 1024, "reason": None},
        {"name": "gamma", "state": "down", "session_started": None, "session_age": None,
         "since": now - 5, "key_fingerprint": fps["gamma"], "peer": None, "last_rtt": None,
         "bytes_in": 0, "bytes_out": 0, "reason": "no answer from peer"},
    ]})  # fmt: skip
    ends = parse_host_output("alpha", hub_manifest, hub)
    beta = {"state": "up", "since": now - 30, "key_fingerprint": fps["beta"]}
    gamma = {"state": "connecting", "reason": "no answer from peer", "since": now - 5}
    ends += parse_host_output("beta", beta_manifest, output("branches", beta))
    ends += parse_host_output("gamma", gamma_manifest, output("branches", gamma))
    hubs = {e.link: e for e in ends if e.link == "branches"}
    by_unit: dict[str, list] = {}
    for end in ends:
        if end.link != "branches":
            by_unit.setdefault(end.link, []).append(end)
    status = FleetStatus([_judge(u, by_unit[u]) for u in sorted(by_unit)], {}, 0.5, hubs=hubs)
    assert [(link.link, link.up) for link in status.links] == [
        ("branches/beta", True),
        ("branches/gamma", False),
    ]
    lines = format_table(status).splitlines()
    assert [line.split()[:5] for line in lines[1:4]] == [
        ["branches", "1/2", "UP", "alpha", "hub"],
        ["beta", "UP", "beta", "client", "up"],
        ["gamma", "DOWN", "gamma", "client", "connecting"],
    ]
    assert "198.18.1.2:40000  30s     1.2ms  2.0K" in lines[2]
    assert lines[3].split("client", 1)[1].strip().startswith("connecting (hub: down)")
    assert lines[-2:] == [
        "DOWN branches/gamma: alpha: down, no answer from peer; gamma: connecting, no answer "
        "from peer",
        "1/2 link(s) up (0.5s)",
    ]
    assert status.to_json()["hubs"]["branches"]["state"] == "up"


def test_a_hub_on_systemd_is_reloaded_through_its_unit(project: Path) -> None:
    before = render(project, "beta, gamma")
    remote = deployed_state(project, before)
    after = render(project, "beta")
    result = plan(project, after, remote)
    result.use_systemd = True
    script = apply_script(result, after, before)
    assert "systemctl reload vpnd-branches || echo 'start-failed branches: systemctl reload" in (
        script
    )
    assert "systemctl restart" not in script and "systemctl stop" not in script
