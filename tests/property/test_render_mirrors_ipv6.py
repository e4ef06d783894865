"""Any valid inventory with IPv6 (IPv6-only and dual-stack hosts, IPv6 routes, opt-outs)
renders configs that parse, carry both families where asked and mirror pairwise; a rendered
IPv6 pair changed on one side is caught by render --check."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vpnctl.inventory import allocate_tunnels, parse_inventory
from vpnctl.pool6 import Record6, allocate_ipv6
from vpnctl.rendering import check_build, render, write_build
from vpnd_runtime.config import parse_config
from vpnd_runtime.keyfile import fingerprint


@st.composite
def inventories(draw: st.DrawFn) -> dict[str, Any]:
    """2..5 hosts, each ipv4, dual or ipv6; 1..6 TCP links between hosts sharing a family."""
    stacks = draw(st.lists(st.sampled_from(["ipv4", "dual", "ipv6"]), min_size=2, max_size=5))
    fam = {"ipv4": {4}, "dual": {4, 6}, "ipv6": {6}}
    if not any(fam[a] & fam[b] for i, a in enumerate(stacks) for b in stacks[i + 1 :]):
        stacks[0] = "dual"  # two hosts with nothing in common cannot be linked
    hosts = []
    for i, stack in enumerate(stacks):
        host: dict[str, Any] = {"name": f"h{i}"}
        if stack == "ipv6":
            host["address"] = f"2001:db8:1::{i + 1:x}"
        else:
            host["address"] = f"198.18.1.{i + 1}"
            if stack == "dual":
                host["address6"] = f"2001:db8:1::{i + 1:x}"
        hosts.append(host)
    pairs = [(s, c) for s in range(len(stacks)) for c in range(len(stacks))
             if s != c and fam[stacks[s]] & fam[stacks[c]]]  # fmt: skip
    links = []
    block = iter(range(100, 250))
    for i in range(draw(st.integers(1, 6))):
        s, c = draw(st.sampled_from(pairs))
        link: dict[str, Any] = {"name": f"l{i}", "server": f"h{s}", "client": f"h{c}",
                                "port": 4000 + i}  # fmt: skip
        opt_out = draw(st.booleans()) and draw(st.booleans())
        if opt_out:
            link["ipv6"] = False
        routes: dict[str, list[str]] = {}
        for role in ("server", "client"):
            nets = []
            for _ in range(draw(st.integers(0, 2))):
                n = next(block)
                if not opt_out and draw(st.booleans()):
                    nets.append(f"2001:db8:{n:x}::/48")
                else:
                    nets.append(f"198.18.{n}.0/24")
            if nets:
                routes[role] = nets
        if routes:
            link["routes"] = routes
        links.append(link)
    return {"version": 1, "hosts": hosts, "links": links}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inventories())
def test_ipv6_inventories_render_dual_stack_configs_that_mirror(document: dict) -> None:
    text = yaml.safe_dump(document, sort_keys=False)
    inventory, _ = allocate_tunnels(parse_inventory(text, "inv.yaml"), {}, "record")
    inventory, _ = allocate_ipv6(inventory, Record6(), "record")
    fingerprints = {
        link.name: fingerprint(hashlib.sha256(link.name.encode()).digest())
        for link in inventory.links
    }
    files = render(inventory, fingerprints)
    for link in inventory.links:
        server = parse_config(files[f"{link.server.host}/etc/vpnd/{link.name}.conf"].decode())
        client = parse_config(files[f"{link.client.host}/etc/vpnd/{link.name}.conf"].decode())
        assert (server.local6, server.remote6) == (client.remote6, client.local6)
        assert (server.local6 is not None) == link.dual_stack
        for config, behind in ((client, link.server.routes), (server, link.client.routes)):
            assert {r.network for r in config.routes} == set(behind)
            for route in config.routes:
                want = config.remote6 if route.version == 6 else config.remote
                assert route.gateway == want
        dialed = client.server_host
        client_families = {a.version for a in inventory.host(link.client.host).addresses}
        assert dialed in {str(a) for a in inventory.host(link.server.host).addresses}
        assert (":" in dialed and 6 in client_families) or (
            ":" not in dialed and 4 in client_families
        )

    with tempfile.TemporaryDirectory(prefix="vpnctl-prop6-") as tmp:
        build = Path(tmp) / "build"
        write_build(files, build)
        assert check_build(inventory, fingerprints, build, files).problems == []
        dual = [lk for lk in inventory.links if lk.dual_stack]
        if dual:
            link = dual[0]
            path = build / link.client.host / "etc" / "vpnd" / f"{link.name}.conf"
            wrong = str(link.server.tunnel6).rsplit(":", 1)[0] + ":7"
            path.write_text(path.read_text().replace(
                f"remote6 {link.server.tunnel6}", f"remote6 {wrong}"))  # fmt: skip
            problems = check_build(inventory, fingerprints, build, None).problems
            assert any("IPv6 tunnel addresses do not mirror" in p for p in problems), problems
