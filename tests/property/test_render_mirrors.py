"""Any valid inventory renders configs that the runtime parses and that mirror pairwise."""

from __future__ import annotations

import hashlib
import tempfile
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vpnctl.inventory import allocate_hubs, allocate_tunnels, hub_networks, parse_inventory
from vpnctl.rendering import check_build, render, write_build
from vpnd_runtime.config import parse_config
from vpnd_runtime.keyfile import fingerprint
from vpnd_runtime.peerfile import parse_peer

CIPHERS = ["chacha20-poly1305", "aes-256-gcm", "aes-128-gcm"]


@st.composite
def inventories(draw: st.DrawFn) -> dict[str, Any]:
    """A valid inventory document: 2..6 hosts, 1..8 links between distinct hosts."""
    host_count = draw(st.integers(2, 6))
    hosts = []
    for i in range(host_count):
        host: dict[str, Any] = {"name": f"h{i}", "address": f"198.18.1.{i + 1}"}
        if draw(st.booleans()):
            host["prefix"] = f"/srv/lab/h{i}"
        host["systemd"] = draw(st.sampled_from([True, False, "auto"]))
        hosts.append(host)
    link_count = draw(st.integers(1, 8))
    links = []
    route_block = iter(range(100, 250))
    for i in range(link_count):
        server = draw(st.integers(0, host_count - 1))
        client = draw(st.integers(0, host_count - 2))
        client = client + 1 if client >= server else client
        link: dict[str, Any] = {"name": f"link-{i}", "server": f"h{server}", "client": f"h{client}"}
        if draw(st.booleans()):
            link["transport"] = "serial"
            link["devices"] = {"server": f"/dev/ttyS{i}", "client": f"/dev/ttyUSB{i}"}
            link["speed"] = draw(st.sampled_from([9600, 57600, 115200]))
            link["xfilter"] = draw(st.booleans())
            link["localline"] = draw(st.booleans())
        else:
            link["port"] = 4000 + i
            if draw(st.booleans()):
                link["transport"] = "udp"
            if draw(st.booleans()):
                link["ipopts"] = draw(st.integers(0, 15))
        if draw(st.booleans()):
            link["tunnel"] = {
                "server": f"198.18.200.{2 * i + 1}",
                "client": f"198.18.200.{2 * i + 2}",
            }
        routes = {}
        for role in ("server", "client"):
            count = draw(st.integers(0, 3))
            if count:
                routes[role] = [f"198.18.{next(route_block)}.0/24" for _ in range(count)]
        if routes:
            link["routes"] = routes
        link["keepalive"] = draw(st.sampled_from([1, 2.5, 10, 30]))
        link["noanswer"] = draw(st.integers(1, 10))
        link["compress"] = draw(st.sampled_from([False, True, 6, 9]))
        link["cipher"] = draw(st.sampled_from(CIPHERS))
        link["mtu"] = draw(st.integers(576, 9000))
        if draw(st.booleans()):
            link["maxdelay"] = draw(st.sampled_from([0.5, 2, 5]))
        if draw(st.booleans()):
            link["hooks"] = {"client": {"linkup": "/usr/local/sbin/up", "linkdown": "/bin/true"}}
        links.append(link)
    return {"version": 1, "hosts": hosts, "links": links}


def key_fingerprints(names: list[str]) -> dict[str, str]:
    """Real fingerprints of per-link keys derived from the link names (reproducible)."""
    return {name: fingerprint(hashlib.sha256(name.encode()).digest()) for name in names}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inventories())
def test_any_valid_inventory_renders_configs_that_parse_and_mirror(document: dict) -> None:
    text = yaml.safe_dump(document, sort_keys=False)
    inventory, _record = allocate_tunnels(parse_inventory(text, "inv.yaml"), {}, "record")
    fingerprints = key_fingerprints([link.name for link in inventory.links])
    files = render(inventory, fingerprints)
    assert render(inventory, fingerprints) == files  # same inputs, same bytes

    for link in inventory.links:
        server_host, client_host = link.server.host, link.client.host
        server = parse_config(files[f"{server_host}/etc/vpnd/{link.name}.conf"].decode())
        client = parse_config(files[f"{client_host}/etc/vpnd/{link.name}.conf"].decode())
        assert (server.mode, client.mode) == ("server", "client")
        assert (server.local, server.remote) == (client.remote, client.local)
        assert server.is_serial == client.is_serial == (link.transport == "serial")
        if not server.is_serial:
            assert server.server_port == client.server_port
            assert client.server_host == str(inventory.host(server_host).address)
        assert {r.network for r in client.routes} == set(link.server.routes)
        assert {r.network for r in server.routes} == set(link.client.routes)
        assert all(r.gateway == client.remote for r in client.routes)
        for name in ("keepalive", "noanswer", "compress", "compress_level", "cipher", "mtu"):
            assert getattr(server, name) == getattr(client, name)

    with tempfile.TemporaryDirectory(prefix="vpnctl-prop-") as tmp:
        build = Path(tmp) / "build"
        write_build(files, build)
        result = check_build(inventory, fingerprints, build, files)
        assert result.problems == []
        assert len(result.verified) == len(inventory.links)


@st.composite
def hub_inventories(draw: st.DrawFn) -> dict[str, Any]:
    """A valid inventory with 1..3 hubs (2..8 hosts; each hub on one host with 1..6 clients,
    client addresses from the pool or pinned in an explicit network), plus maybe a link."""
    host_count = draw(st.integers(2, 8))
    hosts: list[dict[str, Any]] = []
    for i in range(host_count):
        host: dict[str, Any] = {"name": f"h{i}", "address": f"198.18.1.{i + 1}"}
        if draw(st.booleans()):
            host["prefix"] = f"/srv/lab/h{i}"
        host["systemd"] = draw(st.sampled_from([True, False, "auto"]))
        hosts.append(host)
    route_block = iter(range(100, 250))
    hubs = []
    for i in range(draw(st.integers(1, 3))):
        server = draw(st.integers(0, host_count - 1))
        others = [h for h in range(host_count) if h != server]
        chosen = draw(st.lists(st.sampled_from(others), min_size=1, max_size=6, unique=True))
        explicit = draw(st.booleans())
        hub: dict[str, Any] = {"name": f"hub-{i}", "server": f"h{server}", "port": 5000 + i}
        if explicit:
            hub["network"] = f"198.18.{40 + i}.0/24"
        clients: list[Any] = []
        for j, c in enumerate(chosen):
            client: dict[str, Any] = {"host": f"h{c}"}
            if explicit and draw(st.booleans()):
                client["tunnel"] = f"198.18.{40 + i}.{100 + j}"
            if draw(st.booleans()):
                client["routes"] = [f"198.18.{next(route_block)}.0/24"]
            clients.append(client if len(client) > 1 or draw(st.booleans()) else f"h{c}")
        hub["clients"] = clients
        if draw(st.booleans()):
            hub["routes"] = [f"198.18.{next(route_block)}.0/24"]
        hub["clienttoclient"] = draw(st.booleans())
        hub["keepalive"] = draw(st.sampled_from([1, 2.5, 10]))
        hub["cipher"] = draw(st.sampled_from(CIPHERS))
        hub["compress"] = draw(st.sampled_from([False, 6]))
        hubs.append(hub)
    document: dict[str, Any] = {"version": 1, "hosts": hosts, "hubs": hubs}
    if draw(st.booleans()):
        document["links"] = [{"name": "p2p", "server": "h0", "client": "h1", "port": 4000}]
    return document


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hub_inventories())
def test_any_valid_hub_inventory_renders_configs_that_parse_and_pair(document: dict) -> None:
    text = yaml.safe_dump(document, sort_keys=False)
    parsed = parse_inventory(text, "inv.yaml")
    inventory, _record = allocate_tunnels(parsed, {}, "record", hub_networks(parsed, {}))
    inventory, hub_record = allocate_hubs(inventory, {})
    fingerprints = key_fingerprints(inventory.key_names())
    files = render(inventory, fingerprints)
    assert render(inventory, fingerprints) == files

    addresses: set[str] = set()
    for hub in inventory.hubs:
        conf = parse_config(files[f"{hub.server}/etc/vpnd/{hub.name}.conf"].decode())
        assert conf.is_hub and str(conf.local) == str(hub.tunnel)
        assert conf.clienttoclient == hub.clienttoclient
        for client in hub.clients:
            assert client.tunnel in hub.network and client.tunnel != hub.tunnel
            assert str(client.tunnel) not in addresses
            addresses.add(str(client.tunnel))
            peer_rel = f"{hub.server}/etc/vpnd/{hub.name}.peers/{client.name}.peer"
            peer = parse_peer(files[peer_rel].decode(), peer_rel, client.name, default_keyfile="-")
            mine = parse_config(files[f"{client.host}/etc/vpnd/{hub.name}.conf"].decode())
            assert mine.mode == "client"
            assert (mine.local, mine.remote) == (peer.remote, conf.local)
            assert (mine.server_host, mine.server_port) == (
                str(inventory.host(hub.server).address),
                conf.server_port,
            )
            assert {r.network for r in peer.routes} == set(client.routes)
            expected = set(hub.routes) | ({hub.network} if hub.clienttoclient else set())
            assert {r.network for r in mine.routes} == {IPv4Network(n) for n in expected}
            assert all(r.gateway == conf.local for r in mine.routes)
            for name in ("keepalive", "noanswer", "compress", "cipher", "mtu", "keyttl"):
                assert getattr(mine, name) == getattr(conf, name)
        if hub.name in hub_record:
            assert hub_record[hub.name][0] == hub.network

    with tempfile.TemporaryDirectory(prefix="vpnctl-prop-") as tmp:
        build = Path(tmp) / "build"
        write_build(files, build)
        result = check_build(inventory, fingerprints, build, files)
        assert result.problems == []
        pairs = sum(len(hub.clients) for hub in inventory.hubs)
        assert len(result.verified) == len(inventory.links) + pairs
