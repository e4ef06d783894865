"""vpnctl and `transport: udp`: validation, and the rendered pair (transport line, no sendbuf)."""

from __future__ import annotations

import textwrap

from tests.unit.test_inventory_validation import HOSTS, problems, with_links
from vpnctl.inventory import parse_inventory
from vpnctl.rendering import render
from vpnd_runtime.config import parse_config


def test_a_udp_and_a_tcp_link_may_share_a_port_two_udp_links_may_not() -> None:
    ok = with_links("""\
        - name: one
          server: alpha
          client: beta
          transport: udp
        - name: two
          server: alpha
          client: gamma
    """)
    parse_inventory(textwrap.dedent(ok), "inv.yaml")
    text = with_links("""\
        - name: one
          server: alpha
          client: beta
          transport: udp
        - name: two
          server: alpha
          client: gamma
          transport: udp
    """)
    assert problems(text) == [
        "inv.yaml:13 links[1].port: port 379 on host 'alpha' is already used by links[0]"
    ]


def test_unknown_transport_names_the_choices() -> None:
    text = with_links("""\
        - name: one
          server: alpha
          client: beta
          transport: quic
    """)
    (line,) = problems(text)
    assert "links[0].transport" in line and "udp" in line, line


def test_udp_link_renders_a_transport_line_on_both_sides_and_parses() -> None:
    inv = parse_inventory(
        HOSTS + "links:\n  - name: one\n    server: alpha\n    client: beta\n"
        "    transport: udp\n    tunnel: {server: 198.19.0.1, client: 198.19.0.2}\n",
        "inv.yaml",
    )
    files = render(inv, {"one": "ab12:cd34:ef56:7890"})
    confs = {path: text for path, text in files.items() if str(path).endswith(".conf")}
    assert len(confs) == 2, list(files)
    for text in confs.values():
        body = text.decode() if isinstance(text, bytes) else text
        assert "transport udp\n" in body and "sendbuf" not in body
        assert parse_config(body).transport == "udp"
