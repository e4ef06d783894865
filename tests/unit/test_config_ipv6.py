"""IPv6 directives: dual-stack and IPv6-only tunnels, the prefix form of routeN, peer files'
remote6, and every mistake reported with file:line and the directive."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, IPv6Network

import pytest

from vpnd_runtime.config import ConfigError, parse_config
from vpnd_runtime.peerfile import parse_peer

BASE = "mode client\nserver 2001:db8:1::1 379\nlocal 198.19.0.2\nremote 198.19.0.1\n"  # 1-4


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "t.conf")
    return str(caught.value).splitlines()


def test_dual_stack_link_with_routes_of_both_families_round_trips() -> None:
    text = BASE + (
        "local6 fd00:5ee::2\nremote6 fd00:5ee::1\n"
        "route1 198.18.100.0 255.255.255.0 198.19.0.1\n"
        "route2 2001:db8:100::/64 fd00:5ee::1\n"
        "route3 198.18.101.0/24\n"
    )
    config = parse_config(text, "t.conf")
    assert config.server_host == "2001:db8:1::1"
    assert (config.local6, config.remote6) == (
        IPv6Address("fd00:5ee::2"),
        IPv6Address("fd00:5ee::1"),
    )
    assert config.carries_ipv6
    assert [str(r.network) for r in config.routes] == [
        "198.18.100.0/24",
        "2001:db8:100::/64",
        "198.18.101.0/24",
    ]
    assert config.routes[1].network == IPv6Network("2001:db8:100::/64")
    assert config.routes[2].gateway is None
    assert parse_config(config.to_text(), "t.conf") == config


def test_an_ipv6_only_tunnel_and_an_ipv4_config_unchanged() -> None:
    six = parse_config(
        "mode server\nserver :: 379\nlocal fd00:1::1\nremote fd00:1::2\nroute1 2001:db8::/48\n"
    )
    assert six.local == IPv6Address("fd00:1::1") and six.local6 is None and six.carries_ipv6
    plain = parse_config(BASE.replace("2001:db8:1::1", "198.18.1.1"))
    assert plain.local == IPv4Address("198.19.0.2") and not plain.carries_ipv6
    assert "local6" not in plain.to_text()


def test_family_mistakes_name_file_line_and_directive() -> None:
    got = errors(
        BASE
        + "local6 198.19.0.9\n"  # 5
        + "route1 2001:db8::/48\n"  # 6: IPv6 but the tunnel carries no IPv6 (local6 is bad)
        + "route2 2001:db8:1::1/48\n"  # 7
        + "route3 2001:db8:2::/48 198.19.0.1\n"  # 8
        + "mtu 1000\n"  # 9
    )
    assert got == [
        "t.conf:5: local6: local6 address must be an IPv6 address like fd00:5::1, got '198.19.0.9'",
        "t.conf:6: route1: 2001:db8::/48 is IPv6 but the tunnel carries no IPv6: give it "
        "local6/remote6",
        "t.conf:7: route2: destination 2001:db8:1::1/48 has host bits set (did you mean "
        "2001:db8:1::/48?)",
        "t.conf:8: route3: gateway must be an IPv6 address like fd00:5::1, got '198.19.0.1'",
    ]
    got = errors(BASE + "local6 fd00::2\n" + "remote fd00::9\n" + "mtu 1000\n")
    assert "t.conf:6: remote: duplicate directive (first given on line 4)" in got
    assert "t.conf:7: mtu: 1000 is below 1280, the least a link carrying IPv6 may have" in got
    assert "t.conf:5: local6: an IPv6 tunnel needs both ends: add remote6 <ipv6>" in got
    got = errors(BASE.replace("remote 198.19.0.1", "remote fd00::1"))
    assert got == [
        "t.conf:4: remote: fd00::1 is IPv6 but local 198.19.0.2 is IPv4: local and remote are "
        "one family (give IPv6 beside IPv4 as local6/remote6)"
    ]


def test_peer_file_remote6_and_ipv6_routes() -> None:
    peer = parse_peer(
        "remote 198.19.1.10\nremote6 fd00:1::10\nroute1 2001:db8:40::/48 fd00:1::10\n",
        "a.peer",
        "a",
        default_keyfile="/k",
    )
    assert peer.remote6 == IPv6Address("fd00:1::10")
    assert [str(n) for n in peer.networks] == [
        "198.19.1.10/32",
        "fd00:1::10/128",
        "2001:db8:40::/48",
    ]
    with pytest.raises(ConfigError) as caught:
        parse_peer("remote 198.19.1.10\nroute1 2001:db8:40::/48 fd00:1::99\n", "b.peer", "b",
                   default_keyfile="/k")  # fmt: skip
    assert str(caught.value) == (
        "b.peer:2: route1: gateway fd00:1::99 must be this client's address (it has no IPv6 one)"
    )


def test_a_hub_without_ipv6_refuses_a_peer_file_with_ipv6(tmp_path) -> None:
    from vpnd_runtime.config import load_config

    peers = tmp_path / "peers"
    peers.mkdir()
    (peers / "a.peer").write_text("remote 198.19.1.10\nremote6 fd00:1::10\n")
    conf = tmp_path / "hub.conf"
    conf.write_text(f"mode server\nserver 0 379\nlocal 198.19.1.1\npeers {peers}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(conf)
    assert str(caught.value) == (
        f"{peers / 'a.peer'}: remote6: this client has IPv6 addresses or routes but the hub "
        f"carries no IPv6: give the hub a local6 in {conf}"
    )
    conf.write_text(conf.read_text() + "local6 fd00:1::1\n")
    assert load_config(conf).peers[0].remote6 == IPv6Address("fd00:1::10")
