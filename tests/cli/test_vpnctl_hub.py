"""Hubs through the operator's flow: inventory -> keygen -> keys -> render -> render --check.

Whole outputs are compared, as in test_vpnctl_flow.py; every refused inventory names
file:line and the YAML path.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from vpnctl.cli import app

REPO = Path(__file__).resolve().parent.parent.parent

HOSTS = """\
hosts:
  - name: alpha
    address: 198.18.1.1
  - name: beta
    address: 198.18.1.2
  - name: gamma
    address: 198.18.1.3
  - name: delta
    address: 198.18.1.4
"""  # lines 1-9

HUB = (
    HOSTS
    + """\
links:
  - name: office
    server: alpha
    client: beta
    tunnel: {server: 198.18.255.1, client: 198.18.255.2}
hubs:
  - name: branches
    server: alpha
    port: 381
    network: 198.19.50.0/24
    routes: [198.18.10.0/24]
    clients:
      - beta
      - host: gamma
        routes: [198.18.40.0/24]
"""
)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project directory as the cwd (each test writes its inventory.yaml)."""
    monkeypatch.chdir(tmp_path)
    for var in ("VPNCTL_INVENTORY", "VPNCTL_KEYSTORE", "VPNCTL_BUILD"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def fp(project: Path, name: str) -> str:
    return json.loads((project / "keystore" / f"{name}.meta.json").read_text())["fingerprint"]


def write(project: Path, text: str) -> None:
    (project / "inventory.yaml").write_text(textwrap.dedent(text))


def test_hub_keygen_keys_render_and_check_whole_outputs(project: Path) -> None:
    write(project, HUB)
    keygen = run("keygen")
    assert keygen.exit_code == 0, keygen.output
    office, beta, gamma = (fp(project, n) for n in ("office", "branches.beta", "branches.gamma"))
    assert keygen.stdout == (
        f"created office          {office}\n"
        f"created branches.beta   {beta}\n"
        f"created branches.gamma  {gamma}\n"
    )
    keys = run("keys")
    assert keys.exit_code == 0, keys.output
    assert [line.split()[:2] for line in keys.stdout.splitlines()] == [
        ["LINK", "FINGERPRINT"],
        ["office", office],
        ["branches.beta", beta],
        ["branches.gamma", gamma],
    ]
    render = run("render")
    assert render.exit_code == 0, render.output
    assert render.stdout == (
        "created build/alpha/etc/vpnd/branches.conf\n"
        "created build/alpha/etc/vpnd/branches.peers/beta.peer\n"
        "created build/alpha/etc/vpnd/branches.peers/gamma.peer\n"
        "created build/alpha/etc/vpnd/office.conf\n"
        "created build/alpha/manifest.json\n"
        "created build/alpha/systemd/vpnd-branches.service\n"
        "created build/alpha/systemd/vpnd-office.service\n"
        "created build/beta/etc/vpnd/branches.conf\n"
        "created build/beta/etc/vpnd/office.conf\n"
        "created build/beta/manifest.json\n"
        "created build/beta/systemd/vpnd-branches.service\n"
        "created build/beta/systemd/vpnd-office.service\n"
        "created build/delta/manifest.json\n"
        "created build/gamma/etc/vpnd/branches.conf\n"
        "created build/gamma/manifest.json\n"
        "created build/gamma/systemd/vpnd-branches.service\n"
        "rendered 1 link(s) and 1 hub(s) with 2 client(s) for 4 host(s) into build/: "
        "16 file(s) changed\n"
    )
    check = run("render", "--check")
    assert check.exit_code == 0, check.output
    assert check.stdout == (
        f"ok    office: alpha 198.18.255.1 <-> 198.18.255.2 beta  tcp/379  key {office}\n"
        f"ok    branches/beta: hub alpha 198.19.50.1 <-> 198.19.50.2 beta  tcp/381  key {beta}\n"
        f"ok    branches/gamma: hub alpha 198.19.50.1 <-> 198.19.50.3 gamma  tcp/381  key "
        f"{gamma}\n"
        "all 1 link(s) mirror and all 2 hub client(s) pair with their hub; build/ is up to date\n"
    )


def test_hub_files_have_the_spec_shape(project: Path) -> None:
    write(project, HUB)
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    build = project / "build"
    assert (build / "alpha/etc/vpnd/branches.conf").read_text() == (
        "# vpnd hub branches on alpha: one daemon, one port, one TUN for the clients in "
        "/etc/vpnd/branches.peers/\n"
        "# Rendered by vpnctl from inventory.yaml. Do not edit: change the inventory and "
        "re-render.\n"
        "# Adding or removing a client changes only the peers directory (the hub reloads, "
        "never restarts).\n"
        "mode server\nserver 0 381\nlocal 198.19.50.1\npeers /etc/vpnd/branches.peers\n"
        "interface vpn-branches\nmtu 1400\npidfile /run/vpnd/branches.pid\n"
        "statusfile /run/vpnd/branches.status.json\n\n"
        "# Liveness, per client: ping every 10 s; dead after 3 unanswered pings.\n"
        "keepalive 10\nnoanswer 3\n\n"
        "# Session keys: chacha20-poly1305, renewed every 120 s.\n"
        "cipher chacha20-poly1305\nkeyttl 120\nsendbuf 65536\n"
    )
    assert (build / "alpha/etc/vpnd/branches.peers/gamma.peer").read_text() == (
        "# Client gamma of hub branches (host gamma, carrier from 198.18.1.3).\n"
        "# Rendered by vpnctl from inventory.yaml. Do not edit: change the inventory and "
        "re-render.\n"
        "remote 198.19.50.3\nkeyfile /etc/vpnd/branches.peers/gamma.key\n\n"
        "# Networks behind gamma, through the hub\n"
        "route1 198.18.40.0 255.255.255.0 198.19.50.3\n"
    )
    client = (build / "gamma/etc/vpnd/branches.conf").read_text()
    assert "mode client\nserver 198.18.1.1 381\nlocal 198.19.50.3\nremote 198.19.50.1\n" in client
    assert "keyfile /etc/vpnd/branches.key\n" in client
    assert (
        "route1 198.19.50.0 255.255.255.0 198.19.50.1\n"
        "route2 198.18.10.0 255.255.255.0 198.19.50.1\n"
    ) in client
    unit = (build / "alpha/systemd/vpnd-branches.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID\n" in unit
    assert "ExecReload" not in (build / "gamma/systemd/vpnd-branches.service").read_text()
    assert "ExecReload" not in (build / "alpha/systemd/vpnd-office.service").read_text()
    manifest = json.loads((build / "alpha/manifest.json").read_text())["links"]["branches"]
    assert manifest["role"] == "hub"
    assert manifest["peers"] == "/etc/vpnd/branches.peers"
    assert manifest["clients"]["gamma"] == {
        "address": "198.19.50.3",
        "host": "gamma",
        "key": "branches.gamma",
        "key_fingerprint": fp(project, "branches.gamma"),
        "keyfile": "/etc/vpnd/branches.peers/gamma.key",
        "peerfile": "/etc/vpnd/branches.peers/gamma.peer",
        "routes": ["198.18.40.0/24"],
    }
    assert not any("key" in p.name and p.suffix == ".key" for p in build.rglob("*"))


def test_clienttoclient_false_drops_the_route_to_the_hub_network(project: Path) -> None:
    write(project, HUB.replace("    port: 381\n", "    port: 381\n    clienttoclient: false\n"))
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    hub = (project / "build/alpha/etc/vpnd/branches.conf").read_text()
    assert "\n# Clients cannot reach each other through the hub.\nclienttoclient no\n" in hub
    client = (project / "build/beta/etc/vpnd/branches.conf").read_text()
    assert "route1 198.18.10.0 255.255.255.0 198.19.50.1\n" in client
    assert "route2" not in client
    assert run("render", "--check").exit_code == 0


POOLED = (
    HOSTS
    + """\
hubs:
  - name: branches
    server: alpha
    clients: [beta, gamma]
"""
)


def test_adding_a_client_moves_nothing_and_leaves_the_hub_config_alone(project: Path) -> None:
    write(project, POOLED)
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    record = json.loads((project / "keystore/allocations.json").read_text())
    network = record["hubs"]["branches"]["network"]
    assert re.fullmatch(r"198\.19\.[0-9]+\.0/24", network)
    base = network.removesuffix("0/24")
    assert record["hubs"]["branches"]["clients"] == {"beta": f"{base}2", "gamma": f"{base}3"}
    hub_conf = (project / "build/alpha/etc/vpnd/branches.conf").read_bytes()
    hub_unit = (project / "build/alpha/systemd/vpnd-branches.service").read_bytes()

    # delta joins first in the list: nobody moves, delta takes the next free address
    write(project, POOLED.replace("[beta, gamma]", "[delta, beta, gamma]"))
    keygen = run("keygen")
    assert keygen.stdout.splitlines()[0].startswith("created branches.delta")
    render = run("render")
    assert render.stdout == (
        "created build/alpha/etc/vpnd/branches.peers/delta.peer\n"
        "updated build/alpha/manifest.json\n"
        "created build/delta/etc/vpnd/branches.conf\n"
        "updated build/delta/manifest.json\n"
        "created build/delta/systemd/vpnd-branches.service\n"
        "rendered 0 link(s) and 1 hub(s) with 3 client(s) for 4 host(s) into build/: "
        "5 file(s) changed\n"
    )
    record = json.loads((project / "keystore/allocations.json").read_text())
    assert record["hubs"]["branches"] == {
        "network": network,
        "clients": {"beta": f"{base}2", "delta": f"{base}4", "gamma": f"{base}3"},
    }
    assert (project / "build/alpha/etc/vpnd/branches.conf").read_bytes() == hub_conf
    assert (project / "build/alpha/systemd/vpnd-branches.service").read_bytes() == hub_unit

    # removing gamma removes its peer file; re-adding it later gives it its old address back
    write(project, POOLED.replace("[beta, gamma]", "[delta, beta]"))
    render = run("render")
    assert "removed build/alpha/etc/vpnd/branches.peers/gamma.peer\n" in render.stdout
    assert "removed build/gamma/etc/vpnd/branches.conf\n" in render.stdout
    assert (project / "build/alpha/etc/vpnd/branches.conf").read_bytes() == hub_conf
    write(project, POOLED.replace("[beta, gamma]", "[delta, beta, gamma]"))
    assert run("render").exit_code == 0
    peer = (project / "build/alpha/etc/vpnd/branches.peers/gamma.peer").read_text()
    assert f"remote {base}3\n" in peer


def test_hub_problems_name_file_line_and_path(project: Path) -> None:
    write(
        project,
        HOSTS
        + """\
links:
  - name: office
    server: alpha
    client: beta
hubs:
  - name: office
    server: alpha
    clients: [beta]
  - name: branches
    server: alpha
    port: 379
    network: 198.19.50.0/24
    routes: [198.18.10.0/24, 198.18.1.0/24]
    clients:
      - beta
      - host: gamma
        tunnel: 198.19.50.9
        routes: [198.18.40.0/24]
      - host: delta
        tunnel: 198.19.50.9
        routes: [198.18.40.128/25]
      - gamma
      - alpha
      - host: epsilon
      - host: beta
        tunnel: 198.19.60.2
""",
    )
    result = run("render")
    assert result.exit_code == 2
    assert result.stderr == (
        "inventory.yaml:15 hubs[0].name: 'office' is already the name of links[0]: hubs and "
        "links share one namespace (config, unit and key names)\n"
        "inventory.yaml:20 hubs[1].port: port 379 on host 'alpha' is already used by links[0]\n"
        "inventory.yaml:22 hubs[1].routes[1]: 198.18.1.0/24 contains alpha's underlay address "
        "198.18.1.1: beta's carrier to alpha would be routed into a tunnel\n"
        "inventory.yaml:29 hubs[1].clients[2].tunnel: 198.19.50.9 is already used by "
        "hubs[1].clients[1]\n"
        "inventory.yaml:30 hubs[1].clients[2].routes[0]: 198.18.40.128/25 overlaps "
        "hubs[1].clients[1].routes[0] (198.18.40.0/24) (both routed on host 'alpha')\n"
        "inventory.yaml:31 hubs[1].clients[3].host: 'gamma' is listed twice in this hub "
        "(first on line 25)\n"
        "inventory.yaml:32 hubs[1].clients[4].host: 'alpha' is the hub's own server "
        "(hubs[1].server): a hub cannot be its own client\n"
        "inventory.yaml:33 hubs[1].clients[5].host: no host named 'epsilon' in hosts\n"
        "inventory.yaml:34 hubs[1].clients[6].host: 'beta' is listed twice in this hub "
        "(first on line 24)\n"
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("clients: [beta, gamma]", "clients: [beta, {host: gamma, tunnel: 198.19.9.9}]"),
            "inventory.yaml:13 hubs[0].clients[1].tunnel: a client address needs the hub's "
            "network in hubs[0].network (the pool picks the network otherwise)",
        ),
        (
            ("clients: [beta, gamma]", "clients: []"),
            "inventory.yaml:13 hubs[0].clients: the list of clients is empty",
        ),
        (
            ("clients: [beta, gamma]", "clients: [beta]\n    transport: serial"),
            "inventory.yaml:14 hubs[0].transport: a hub serves its clients over tcp; serial is "
            "for point-to-point links",
        ),
        (
            ("clients: [beta, gamma]", "clients: [beta]\n    network: 198.18.1.0/24"),
            "inventory.yaml:14 hubs[0].network: 198.18.1.0/24 contains the underlay address "
            "198.18.1.1 of hosts[0].address",
        ),
        (
            ("clients: [beta, gamma]", "clients: [beta]\n    clientstoclient: false"),
            "inventory.yaml:14 hubs[0].clientstoclient: unknown key; did you mean "
            "'clienttoclient'?",
        ),
        (
            ("server: alpha", "server: alpah"),
            "inventory.yaml:12 hubs[0].server: no host named 'alpah' in hosts; did you mean "
            "'alpha'?",
        ),
    ],
)
def test_one_hub_problem_per_case(project: Path, change: tuple[str, str], expected: str) -> None:
    write(project, POOLED.replace(*change))
    result = run("render")
    assert result.exit_code == 2
    assert result.stderr == f"vpnctl: {expected}\n"


def test_check_names_a_peer_file_that_does_not_pair(project: Path) -> None:
    write(project, HUB)
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    peer = project / "build/alpha/etc/vpnd/branches.peers/beta.peer"
    peer.write_text(peer.read_text().replace("remote 198.19.50.2", "remote 198.19.50.7"))
    check = run("render", "--check")
    assert check.exit_code == 1
    office, gamma = fp(project, "office"), fp(project, "branches.gamma")
    assert check.stdout == (
        f"ok    office: alpha 198.18.255.1 <-> 198.18.255.2 beta  tcp/379  key {office}\n"
        f"ok    branches/gamma: hub alpha 198.19.50.1 <-> 198.19.50.3 gamma  tcp/381  key "
        f"{gamma}\n"
        "FAIL  build/alpha/etc/vpnd/branches.peers/beta.peer: sha256 differs from "
        "build/alpha/manifest.json (edited by hand?)\n"
        "FAIL  hub branches client beta: tunnel addresses do not mirror: hub 198.19.50.1, "
        "peer file remote 198.19.50.7; client 198.19.50.2->198.19.50.1\n"
        "FAIL  build/alpha/etc/vpnd/branches.peers/beta.peer: out of date with the inventory; "
        "run `vpnctl render`\n"
    )


def test_a_hub_client_key_can_be_rotated_by_its_pair_name(project: Path) -> None:
    write(project, HUB)
    assert run("keygen").exit_code == 0
    old = fp(project, "branches.beta")
    staged = run("keygen", "--rotate", "branches.beta")
    assert staged.exit_code == 0, staged.output
    assert staged.stdout.startswith("staged  branches.beta  ")
    assert run("keygen", "--promote", "branches.beta").exit_code == 0
    assert fp(project, "branches.beta") != old
    unknown = run("keygen", "--rotate", "branches.zeta")
    assert unknown.exit_code == 2
    assert "no such link in inventory.yaml (office, branches.beta, branches.gamma)" in (
        unknown.stderr
    )


def test_the_example_hub_section_is_valid_when_uncommented(project: Path) -> None:
    text = (REPO / "inventory.example.yaml").read_text()
    (project / "inventory.yaml").write_text(text)
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    head, hubs = text.split("# hubs:\n", 1)
    lines = ["hubs:"] + [line[2:] if line.startswith("# ") else line for line in hubs.splitlines()]
    (project / "inventory.yaml").write_text(head + "\n".join(lines) + "\n")
    assert run("keygen").exit_code == 0
    render = run("render")
    assert render.exit_code == 0, render.output
    assert "and 1 hub(s) with 2 client(s) for 3 host(s)" in render.stdout
    # adding a hub adds files and manifest entries; no link's file changes by a byte
    changed = [line.split()[1] for line in render.stdout.splitlines()[:-1]]
    assert [p for p in changed if "branches" not in p and not p.endswith("manifest.json")] == []
    check = run("render", "--check")
    assert check.exit_code == 0, check.output
    assert "all 2 link(s) mirror and all 2 hub client(s) pair with their hub" in check.stdout


def test_pinning_an_address_another_client_holds_is_refused_not_moved(project: Path) -> None:
    write(project, HUB)
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0  # beta 198.19.50.2, gamma 198.19.50.3 recorded
    write(project, HUB.replace("      - beta\n", "      - {host: beta, tunnel: 198.19.50.3}\n"))
    result = run("render")
    assert result.exit_code == 2
    assert result.stderr == (
        "vpnctl: inventory.yaml:22 hubs[0].clients[0].tunnel: 198.19.50.3 is already allocated "
        "to client 'gamma' of this hub in keystore/allocations.json\n"
    )
