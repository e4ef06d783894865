"""Every inventory validation error names the file, the line and the YAML path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from vpnctl.inventory import InventoryError, load_inventory, parse_inventory

FIXTURES = Path(__file__).parent.parent / "fixtures" / "inventories"

HOSTS = """\
hosts:
  - name: alpha
    address: 198.18.1.1
  - name: beta
    address: 198.18.1.2
  - name: gamma
    address: 198.18.1.3
"""  # lines 1-7


def problems(text: str) -> list[str]:
    """The problem lines the inventory ``text`` is refused with (file name inv.yaml)."""
    with pytest.raises(InventoryError) as caught:
        parse_inventory(textwrap.dedent(text), "inv.yaml")
    return str(caught.value).splitlines()


def with_links(links: str) -> str:
    """HOSTS followed by ``links:`` (line 8) and the given link items (from line 9)."""
    return HOSTS + "links:\n" + textwrap.dedent(links)


def test_fixture_inventories_are_valid() -> None:
    for path in sorted(FIXTURES.glob("*.yaml")):
        inventory = load_inventory(path)
        assert inventory.links, path


def test_example_inventory_is_valid_and_uses_only_benchmark_addresses() -> None:
    from ipaddress import IPv4Network

    example = Path(__file__).parent.parent.parent / "inventory.example.yaml"
    inventory = load_inventory(example)
    bench = IPv4Network("198.18.0.0/15")
    for host in inventory.hosts:
        assert host.address in bench
    for link in inventory.links:
        for side in (link.server, link.client):
            assert side.tunnel is None or side.tunnel in bench
            assert all(net.subnet_of(bench) for net in side.routes)
    assert inventory.pool.subnet_of(bench)


def test_tunnel_address_used_twice_names_the_first_user() -> None:
    text = with_links("""\
        - name: one
          server: alpha
          client: beta
          tunnel: {server: 198.19.0.1, client: 198.19.0.2}
        - name: two
          server: alpha
          client: gamma
          port: 380
          tunnel:
            server: 198.19.0.5
            client: 198.19.0.1
    """)
    assert problems(text) == [
        "inv.yaml:19 links[1].tunnel.client: 198.19.0.1 is already used by links[0]"
    ]


def test_tunnel_address_equal_to_an_underlay_address_is_refused() -> None:
    text = with_links("""\
        - name: one
          server: alpha
          client: beta
          tunnel:
            server: 198.18.1.3
            client: 198.19.0.2
    """)
    assert problems(text) == [
        "inv.yaml:13 links[0].tunnel.server: 198.18.1.3 is the underlay address of hosts[2].address"
    ]


def test_only_one_tunnel_side_given_is_refused() -> None:
    text = with_links("""\
        - name: one
          server: alpha
          client: beta
          tunnel:
            server: 198.19.0.1
    """)
    assert problems(text) == [
        "inv.yaml:13 links[0].tunnel: give both server and client addresses, or leave tunnel "
        "out to use the pool"
    ]


def test_only_one_tunnel6_side_given_is_refused() -> None:
    text = with_links("""\
        - name: one
          server: alpha
          client: beta
          tunnel6:
            client: fd00:5ee::2
    """)
    assert problems(text) == [
        "inv.yaml:13 links[0].tunnel6: give both server and client IPv6 addresses, or leave "
        "tunnel6 out to use the pool"
    ]


def test_duplicate_host_name_is_refused() -> None:
    text = HOSTS + "  - name: beta\n    address: 198.18.1.9\nlinks:\n"
    text += "  - {name: one, server: alpha, client: beta}\n"
    assert problems(text) == [
        "inv.yaml:8 hosts[3].name: duplicate host name 'beta' (also hosts[1])"
    ]


def test_empty_lists_of_hosts_or_links_are_refused() -> None:
    assert problems("hosts: []\nlinks:\n") == [
        "inv.yaml:1 hosts: the list of hosts is empty",
        "inv.yaml:2 links: the list of links is empty",
    ]


def test_duplicate_underlay_address_is_refused() -> None:
    text = HOSTS + "  - name: delta\n    address: 198.18.1.2\n" + "links:\n"
    text += "  - {name: one, server: alpha, client: beta}\n"
    assert problems(text) == [
        "inv.yaml:9 hosts[3].address: 198.18.1.2 is already used by hosts[1].address"
    ]


def test_duplicate_link_name_is_refused() -> None:
    text = with_links("""\
        - name: one
          server: alpha
          client: beta
        - name: one
          server: alpha
          client: gamma
          port: 380
    """)
    assert problems(text) == [
        "inv.yaml:12 links[1].name: duplicate link name 'one' (also links[0])"
    ]


def test_two_links_on_one_server_port_are_refused() -> None:
    text = with_links("""\
        - name: one
          server: alpha
          client: beta
        - name: two
          server: alpha
          client: gamma
    """)
    # links[1] gets port 379 from the defaults: the error points at the link itself.
    assert problems(text) == [
        "inv.yaml:12 links[1].port: port 379 on host 'alpha' is already used by links[0]"
    ]


def test_explicit_duplicate_port_points_at_the_port_line() -> None:
    text = with_links("""\
        - name: one
          server: alpha
          client: beta
          port: 4000
        - name: two
          server: alpha
          client: gamma
          port: 4000
    """)
    assert problems(text) == [
        "inv.yaml:16 links[1].port: port 4000 on host 'alpha' is already used by links[0]"
    ]


def test_overlapping_routes_on_one_host_are_refused() -> None:
    text = with_links("""\
        - name: one
          server: alpha
          client: beta
          routes:
            server: [198.18.10.0/24]
        - name: two
          server: gamma
          client: beta
          routes:
            server:
              - 198.18.10.128/25
    """)
    assert problems(text) == [
        "inv.yaml:19 links[1].routes.server[0]: 198.18.10.128/25 overlaps "
        "links[0].routes.server[0] (198.18.10.0/24) (both routed on host 'beta')"
    ]


def test_route_covering_the_far_underlay_address_is_refused() -> None:
    text = with_links("""\
        - name: one
          server: alpha
          client: beta
          routes:
            server: [198.18.1.0/24]
    """)
    assert problems(text) == [
        "inv.yaml:13 links[0].routes.server[0]: 198.18.1.0/24 contains alpha's underlay "
        "address 198.18.1.1: beta's carrier to alpha would be routed into a tunnel"
    ]


def test_route_covering_the_underlay_address_of_another_peer_is_refused() -> None:
    text = with_links("""\
        - name: one
          server: alpha
          client: beta
          routes:
            server: [198.18.1.3/32]
        - name: two
          server: gamma
          client: beta
    """)
    assert problems(text) == [
        "inv.yaml:13 links[0].routes.server[0]: 198.18.1.3/32 contains gamma's underlay "
        "address 198.18.1.3: beta's carrier to gamma would be routed into a tunnel"
    ]


def test_link_port_equal_to_the_servers_ssh_port_is_refused() -> None:
    text = with_links("- {name: one, server: alpha, client: beta, port: 22}\n")
    assert problems(text) == [
        "inv.yaml:9 links[0].port: port 22 on host 'alpha' is its ssh port: vpnd could not "
        "listen there (and deploy needs ssh)"
    ]


def test_route_with_host_bits_gets_a_hint() -> None:
    text = with_links("""\
        - name: one
          server: alpha
          client: beta
          routes:
            client: [198.18.20.1/24]
    """)
    assert problems(text) == [
        "inv.yaml:13 links[0].routes.client[0]: 198.18.20.1/24 has host bits set; did you mean "
        "198.18.20.0/24?"
    ]


def test_more_than_nine_routes_per_side_are_refused() -> None:
    nets = ", ".join(f"198.18.{30 + i}.0/24" for i in range(10))
    text = with_links(f"""\
        - name: one
          server: alpha
          client: beta
          routes:
            client: [{nets}]
    """)
    assert problems(text) == [
        "inv.yaml:13 links[0].routes.client[9]: at most 9 routes per side (vpnd has route1..route9)"
    ]


def test_unknown_key_gets_a_did_you_mean_hint() -> None:
    text = with_links("""\
        - name: one
          server: alpha
          client: beta
          keepalvie: 5
    """)
    assert problems(text) == [
        "inv.yaml:12 links[0].keepalvie: unknown key; did you mean 'keepalive'?"
    ]


def test_unknown_top_level_key_lists_the_known_keys() -> None:
    text = "zzz: 1\n" + with_links("- {name: one, server: alpha, client: beta}\n")
    assert problems(text) == [
        "inv.yaml:1 zzz: unknown key; known keys: version, defaults, hosts, links, hubs"
    ]


def test_wrong_types_are_refused_with_what_was_found() -> None:
    text = with_links("""\
        - name: one
          server: alpha
          client: beta
          port: "379"
          keepalive: soon
          compress: 12
          routes: 198.18.20.0/24
    """)
    assert problems(text) == [
        "inv.yaml:12 links[0].port: expected a whole number, got '379'",
        "inv.yaml:13 links[0].keepalive: expected a number of seconds, got 'soon'",
        "inv.yaml:14 links[0].compress: expected false, true or a zlib level 1..9, got 12",
        "inv.yaml:15 links[0].routes: expected a mapping (key: value), got '198.18.20.0/24'",
    ]


def test_link_naming_a_missing_host_gets_a_hint() -> None:
    text = with_links("""\
        - name: one
          server: alpha
          client: betta
    """)
    assert problems(text) == [
        "inv.yaml:11 links[0].client: no host named 'betta' in hosts; did you mean 'beta'?"
    ]


def test_link_from_a_host_to_itself_is_refused() -> None:
    text = with_links("- {name: one, server: alpha, client: alpha}\n")
    assert problems(text) == [
        "inv.yaml:9 links[0].client: server and client are both 'alpha': a link joins two "
        "different hosts"
    ]


def test_missing_required_keys_are_named() -> None:
    text = HOSTS + "  - name: delta\nlinks:\n  - name: one\n    server: alpha\n"
    assert problems(text) == [
        "inv.yaml:8 hosts[3].address: missing required key 'address'",
        "inv.yaml:10 links[0].client: missing required key 'client'",
    ]


def test_duplicate_yaml_key_is_refused() -> None:
    text = with_links("""\
        - name: one
          server: alpha
          client: beta
          port: 380
          port: 381
    """)
    assert problems(text) == ["inv.yaml:13 links[0].port: duplicate key (first given on line 12)"]


def test_serial_settings_on_a_tcp_link_are_refused() -> None:
    text = with_links("""\
        - name: one
          server: alpha
          client: beta
          speed: 9600
    """)
    assert problems(text) == [
        "inv.yaml:12 links[0].speed: applies only to serial links (set transport: serial)"
    ]


def test_serial_link_without_devices_is_refused() -> None:
    text = with_links("""\
        - name: one
          server: alpha
          client: beta
          transport: serial
          port: 380
    """)
    assert problems(text) == [
        "inv.yaml:9 links[0].devices.client: a serial link needs the client's serial device, "
        "e.g. /dev/ttyS0",
        "inv.yaml:9 links[0].devices.server: a serial link needs the server's serial device, "
        "e.g. /dev/ttyS0",
        "inv.yaml:13 links[0].port: applies only to tcp links",
    ]


def test_interface_names_derived_from_long_link_names_must_stay_unique() -> None:
    text = with_links("""\
        - name: headquarters-a
          server: alpha
          client: beta
        - name: headquarters-b
          server: alpha
          client: gamma
          port: 380
    """)
    assert problems(text) == [
        "inv.yaml:12 links[1].interface: interface 'vpn-headquarter' on host 'alpha' is already "
        "used by links[0] (derived from the link name; set links[N].interface to choose another)"
    ]


def test_invalid_yaml_reports_the_line() -> None:
    assert problems("hosts:\n  - name: [alpha\n") == [
        "inv.yaml:3: not valid YAML: expected ',' or ']', but got '<stream end>'"
    ]


def test_underlay_address_inside_the_tunnel_pool_is_refused() -> None:
    text = HOSTS.replace("198.18.1.3", "198.19.7.7") + "links:\n"
    text += "  - {name: one, server: alpha, client: beta}\n"
    assert problems(text) == [
        "inv.yaml:7 hosts[2].address: 198.19.7.7 lies inside the tunnel pool 198.19.0.0/16 "
        "(defaults.tunnel_pool)"
    ]


def test_defaults_apply_unless_a_host_or_link_overrides_them() -> None:
    text = textwrap.dedent("""\
        defaults:
          ssh: {user: ops, port: 2200, options: [ConnectTimeout=3]}
          prefix: /srv/vpn
          keepalive: 7
          mtu: 1300
        hosts:
          - name: alpha
            address: 198.18.1.1
            ssh: {port: 22}
          - name: beta
            address: 198.18.1.2
            prefix: /
        links:
          - name: one
            server: alpha
            client: beta
            mtu: 1280
    """)
    inventory = parse_inventory(text, "inv.yaml")
    alpha, beta = inventory.hosts
    assert (alpha.ssh.user, alpha.ssh.port, alpha.ssh.host) == ("ops", 22, "198.18.1.1")
    assert alpha.ssh.options == ("ConnectTimeout=3",)
    assert (alpha.prefix, beta.prefix) == ("/srv/vpn", "/")
    link = inventory.links[0]
    assert (link.tunables.keepalive, link.tunables.mtu, link.tunables.port) == (7.0, 1280, 379)
    assert link.interface == "vpn-one"


def test_missing_inventory_file_says_how_to_start(tmp_path: Path) -> None:
    with pytest.raises(InventoryError) as caught:
        load_inventory(tmp_path / "inventory.yaml")
    assert str(caught.value) == (
        f"{tmp_path / 'inventory.yaml'}: no such inventory file (start from "
        "inventory.example.yaml: cp inventory.example.yaml inventory.yaml)"
    )


def test_systemd_takes_true_false_or_auto() -> None:
    text = HOSTS.replace(
        "    address: 198.18.1.2\n", "    address: 198.18.1.2\n    systemd: maybe\n"
    )
    text += "links:\n  - {name: one, server: alpha, client: beta}\n"
    assert problems(text) == [
        "inv.yaml:6 hosts[1].systemd: expected true, false or auto, got 'maybe'"
    ]


def test_ssh_target_in_defaults_is_refused_because_it_is_per_host() -> None:
    text = "defaults:\n  ssh:\n    host: 198.18.0.1\n" + with_links(
        "- {name: one, server: alpha, client: beta}\n"
    )
    assert problems(text) == [
        "inv.yaml:3 defaults.ssh.host: the ssh target is per host: set hosts[N].ssh.host instead"
    ]


def test_yaml_merge_keys_share_settings_between_links() -> None:
    text = with_links("""\
        - &common
          name: one
          server: alpha
          client: beta
          keepalive: 4
        - <<: *common
          name: two
          client: gamma
          port: 380
    """)
    inventory = parse_inventory(text, "inv.yaml")
    two = inventory.link("two")
    assert (two.server.host, two.client.host, two.tunables.keepalive) == ("alpha", "gamma", 4.0)


def test_relative_prefix_and_hook_paths_are_refused() -> None:
    text = HOSTS.replace("    address: 198.18.1.1\n", "    address: 198.18.1.1\n    prefix: srv\n")
    text += "links:\n  - name: one\n    server: alpha\n    client: beta\n"
    text += "    hooks:\n      server: {linkup: up.sh}\n"
    assert problems(text) == [
        "inv.yaml:4 hosts[0].prefix: must be an absolute path (starting with /), got 'srv'",
        "inv.yaml:14 links[0].hooks.server.linkup: must be an absolute path (starting with /), "
        "got 'up.sh'",
    ]


def test_ssh_host_user_or_jump_host_that_would_be_read_as_an_ssh_option_is_refused() -> None:
    text = HOSTS.replace(
        "    address: 198.18.1.1\n",
        "    address: 198.18.1.1\n    ssh:\n      host: -oProxyCommand=touch\n"
        "      user: -lroot\n      proxyjump: a@b,-oX=y\n",
    )
    text += "links:\n  - {name: one, server: alpha, client: beta}\n"
    assert problems(text) == [
        "inv.yaml:5 hosts[0].ssh.host: expected a host name or address, not starting with '-': "
        "'-oProxyCommand=touch'",
        "inv.yaml:6 hosts[0].ssh.user: expected a user name (letters, digits, _ . -), not "
        "starting with '-': '-lroot'",
        "inv.yaml:7 hosts[0].ssh.proxyjump: expected [user@]host[:port][,...], not starting "
        "with '-': 'a@b,-oX=y'",
    ]


def test_plain_ssh_hosts_users_and_jump_chains_are_accepted() -> None:
    text = HOSTS.replace(
        "    address: 198.18.1.1\n",
        "    address: 198.18.1.1\n    ssh:\n      host: gw-1.example.net\n"
        "      user: vpn.admin\n      proxyjump: ops@198.18.0.254:2222,bastion\n",
    )
    text += "links:\n  - {name: one, server: alpha, client: beta}\n"
    ssh = parse_inventory(text, "inv.yaml").hosts[0].ssh
    assert (ssh.host, ssh.user, ssh.proxyjump) == (
        "gw-1.example.net",
        "vpn.admin",
        "ops@198.18.0.254:2222,bastion",
    )


def test_prefix_with_characters_systemd_or_the_shell_would_expand_is_refused() -> None:
    text = HOSTS.replace(
        "    address: 198.18.1.1\n", "    address: 198.18.1.1\n    prefix: /srv/%h$X\n"
    )
    text += "links:\n  - {name: one, server: alpha, client: beta}\n"
    assert problems(text) == [
        "inv.yaml:4 hosts[0].prefix: use only letters, digits and _ . - / in a prefix: '/srv/%h$X'"
    ]
