"""The rtnetlink module and Tun against a real kernel: addresses and routes really appear in
`ip addr`/`ip route` inside a namespace the test created, and refusals read clearly.

The test thread enters the namespace with setns(2) (only the calling thread moves; it moves back
on exit), so Tun and RtNetlink run in-process against the namespace's own routing tables.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.conftest import require_root_netns
from tests.helpers.netns import Netns, namespace_pair, new_tag, run
from vpnd_runtime.io import netlink
from vpnd_runtime.io.tun import Tun, TunError

pytestmark = pytest.mark.root

CLONE_NEWNET = 0x40000000
net = ipaddress.ip_network
addr = ipaddress.ip_address


@contextmanager
def inside(ns: Netns) -> Iterator[None]:
    """Run the calling thread inside `ns` (setns), back in the original namespace on exit."""
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns {ns.name}: {os.strerror(code)}")
        try:
            yield
        finally:
            if libc.setns(original, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the original namespace")
    finally:
        os.close(original)
        os.close(target)


def routes(ns: Netns, family: str = "-4") -> list[dict]:
    """The main table as `ip -j route` reports it."""
    return json.loads(ns.run("ip", "-j", family, "route", "show", "table", "main").stdout)


@pytest.fixture
def pair():
    require_root_netns()
    with namespace_pair(new_tag("nl")) as p:
        yield p


def test_tun_configure_add_and_remove_routes_show_in_ip(pair) -> None:
    ns = pair.client
    name = f"{pair.tag}t"
    with inside(ns):
        tun = Tun.open(name)
        try:
            tun.configure(addr("198.19.0.2"), addr("198.19.0.1"), 1400)
            tun.add_route(net("198.19.8.0/24"), addr("198.19.0.1"))
            tun.add_route(net("198.19.9.0/24"))  # no gateway: straight out of the TUN
            tun.add_route(net("198.19.10.0/24"))
            link = json.loads(ns.run("ip", "-j", "addr", "show", "dev", name).stdout)[0]
            assert link["mtu"] == 1400
            assert "UP" in link["flags"]
            (a,) = [i for i in link["addr_info"] if i["family"] == "inet"]
            assert (a["local"], a["address"], a["prefixlen"]) == ("198.19.0.2", "198.19.0.1", 32)
            table = {r["dst"]: r for r in routes(ns)}
            assert table["198.19.0.1"]["dev"] == name  # the kernel's peer route
            assert table["198.19.8.0/24"]["gateway"] == "198.19.0.1"
            assert table["198.19.8.0/24"]["dev"] == name
            assert table["198.19.9.0/24"]["dev"] == name
            assert table["198.19.9.0/24"]["scope"] == "link"
            assert "gateway" not in table["198.19.9.0/24"]

            # One route removed on its own; removing it again says there was none.
            assert tun.remove_route(net("198.19.9.0/24")) is True
            assert tun.remove_route(net("198.19.9.0/24")) is False
            assert tun.remove_route(net("198.19.77.0/24")) is False  # never added here
            dsts = {r["dst"] for r in routes(ns)}
            assert "198.19.9.0/24" not in dsts
            assert {"198.19.8.0/24", "198.19.10.0/24"} <= dsts

            # A route the operator removed by hand is no problem at teardown.
            ns.run("ip", "route", "del", "198.19.10.0/24")
            assert tun.remove_routes() == []
            assert not {"198.19.8.0/24", "198.19.10.0/24"} & {r["dst"] for r in routes(ns)}
        finally:
            tun.close()
    assert not ns.link_exists(name)


def test_pin_route_pins_the_carrier_path_and_is_removed(pair) -> None:
    ns = pair.client
    name = f"{pair.tag}t"
    ns.run("ip", "route", "add", "198.18.200.0/24", "via", pair.server_ip)
    with inside(ns):
        tun = Tun.open(name)
        try:
            tun.configure(addr("198.19.0.2"), addr("198.19.0.1"), 1400)
            # Directly connected: a link-scope /32 out of the veth.
            assert tun.pin_route(addr(pair.server_ip)) == (
                f"{pair.server_ip} via direct (ifindex {netlink_index(pair.client_if)})"
            )
            # Behind a gateway: the /32 keeps the gateway.
            assert tun.pin_route(addr("198.18.200.7")) is not None
            # Pinned already: nothing to undo.
            assert tun.pin_route(addr(pair.server_ip)) is None
            # Unreachable: nothing to pin.
            assert tun.pin_route(addr("198.18.99.9")) is None
            # Through the tunnel itself: never pinned (that would be the loop).
            assert tun.pin_route(addr("198.19.0.1")) is None
            table = {r["dst"]: r for r in routes(ns)}
            assert table[pair.server_ip]["dev"] == pair.client_if
            assert "gateway" not in table[pair.server_ip]
            assert table["198.18.200.7"]["gateway"] == pair.server_ip
            assert tun.remove_routes() == []
            dsts = {r["dst"] for r in routes(ns)}
            assert pair.server_ip not in dsts
            assert "198.18.200.7" not in dsts
        finally:
            tun.close()


def netlink_index(ifname: str) -> int:
    """The ifindex of `ifname` in the calling thread's namespace."""
    return socket.if_nametoindex(ifname)


def test_refusals_name_the_request_and_the_reason(pair) -> None:
    ns = pair.client
    name = f"{pair.tag}t"
    with inside(ns):
        tun = Tun.open(name)
        try:
            tun.configure(addr("198.19.0.2"), addr("198.19.0.1"), 1400)
            tun.add_route(net("198.19.8.0/24"))
            with pytest.raises(TunError) as exc:
                tun.add_route(net("198.19.8.0/24"))
            assert exc.value.errno == errno.EEXIST
            assert "route 198.19.8.0/24" in str(exc.value)
            assert "exists" in str(exc.value)
            # A gateway that is not on any link.
            with pytest.raises(TunError) as exc:
                tun.add_route(net("198.19.20.0/24"), addr("198.18.99.1"))
            assert "198.19.20.0/24 via 198.18.99.1" in str(exc.value)
            # The same address twice on the interface.
            with pytest.raises(TunError) as exc:
                tun.configure(addr("198.19.0.2"), addr("198.19.0.1"), 1400)
            assert exc.value.errno == errno.EEXIST
            assert name in str(exc.value)
            # An MTU the kernel refuses (a TUN allows 68..65535).
            with pytest.raises(TunError) as exc:
                Tun(name=name, fd=-1).configure(addr("198.19.0.3"), addr("198.19.0.1"), 20)
            assert exc.value.errno == errno.EINVAL
            assert "mtu 20" in str(exc.value)
        finally:
            tun.close()
        with pytest.raises(TunError) as exc:
            Tun(name=name, fd=-1).configure(addr("198.19.0.2"), addr("198.19.0.1"), 1400)
        assert exc.value.errno == errno.ENODEV
        assert "vanished" in str(exc.value)


def test_rtnetlink_ipv6_address_and_routes_on_the_veth(pair) -> None:
    ns = pair.client
    name = pair.client_if
    with inside(ns), netlink.RtNetlink() as nl:
        index = netlink_index(name)
        nl.set_link(index, mtu=1400, up=True)
        nl.add_address(index, addr("fd00:198:18::1"), 64)
        nl.add_route(net("fd00:198:19::/64"), oif=index)
        nl.add_route(net("fd00:198:20::/64"), oif=index, gateway=addr("fd00:198:18::2"))
        found = nl.get_route(addr("fd00:198:20::5"))
        assert found is not None
        assert (found.oif, found.gateway) == (index, addr("fd00:198:18::2"))
        info = json.loads(ns.run("ip", "-j", "-6", "addr", "show", "dev", name).stdout)[0]
        assert {"fd00:198:18::1"} <= {a["local"] for a in info["addr_info"]}
        table = {r["dst"]: r for r in routes(ns, "-6")}
        assert table["fd00:198:19::/64"]["dev"] == name
        assert table["fd00:198:20::/64"]["gateway"] == "fd00:198:18::2"
        nl.del_route(net("fd00:198:20::/64"), oif=index)
        nl.del_address(index, addr("fd00:198:18::1"), 64)
        with pytest.raises(netlink.NetlinkError) as exc:
            nl.del_route(net("fd00:198:20::/64"), oif=index)
        assert exc.value.errno == errno.ESRCH
        assert "removing route fd00:198:20::/64" in str(exc.value)
        nl.set_link(index, up=False)
    assert "fd00:198:20::/64" not in {r["dst"] for r in routes(ns, "-6")}
    assert "fd00:198:18::1" not in ns.run("ip", "-6", "addr", "show", "dev", name).stdout
    link = json.loads(ns.run("ip", "-j", "link", "show", name).stdout)[0]
    assert link["mtu"] == 1400
    assert "UP" not in link["flags"]


def test_permission_error_says_root_is_needed() -> None:
    require_root_netns()
    # Drop CAP_NET_ADMIN in a child: the kernel's EPERM must come out with the hint.
    script = (
        "import ipaddress, errno\n"
        "from vpnd_runtime.io import netlink\n"
        "with netlink.RtNetlink() as nl:\n"
        "    try:\n"
        "        nl.add_route(ipaddress.ip_network('198.19.250.0/24'), oif=1)\n"
        "    except netlink.NetlinkError as exc:\n"
        "        print(exc.errno == errno.EPERM, exc)\n"
    )
    tag = new_tag("nl")
    ns = Netns(f"{tag}-p")
    run("ip", "netns", "add", ns.name)
    try:
        proc = ns.run(
            "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all",
            sys.executable, "-c", script, check=False,
        )  # fmt: skip
    finally:
        run("ip", "netns", "del", ns.name, check=False)
    assert proc.stdout.startswith("True"), proc.stdout + proc.stderr
    assert "needs root" in proc.stdout
