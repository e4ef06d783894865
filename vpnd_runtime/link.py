"""The link's kernel side: the TUN, the routes through it, and the hooks around them.

The TUN exists while at least one peer is up: `peer_up` creates it (slipup) for the first peer
and `peer_down` removes it (slipdown) after the last, so a point-to-point link has its TUN exactly
while the link is up, and a hub while it serves anyone. Each peer's routes are added with it and
removed with it (a hub routes each client's address and networks onto the device; a
point-to-point link adds route1..9 via the far end and, with `autoroute`, pins the carrier's
route). linkup/linkdown run once per peer up/down, each down hook only after its up hook ran.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Callable

from vpnd_runtime.config import Config
from vpnd_runtime.io.hooks import HookRunner
from vpnd_runtime.io.tun import Tun, TunError, TunWriter
from vpnd_runtime.peers import Peer
from vpnd_runtime.status import StatusRecord

log = logging.getLogger("vpnd")


class Link:
    """The TUN and what hangs off it. `unwatch` is called before the TUN's fd is closed."""

    def __init__(
        self,
        config: Config,
        hooks: HookRunner,
        status: StatusRecord,
        unwatch: Callable[[], None],
    ) -> None:
        self.config = config
        self.hooks = hooks
        self.status = status
        self._unwatch = unwatch
        self.tun: Tun | None = None
        self.writer: TunWriter | None = None
        self.up_count = 0  # peers whose linkup ran
        self._linkup_ran: set[Peer] = set()
        self._slipup_ran = False
        self._in_base = (0, 0)  # packets/bytes written by TUN writers of earlier TUNs
        self._tun_drops: dict[str, int] = {}  # what they dropped, by reason

    @property
    def hub(self) -> bool:
        return self.config.is_hub

    @property
    def tun_drops(self) -> dict[str, int]:
        """Packets the TUN writers dropped (queue full, write errors), over every TUN this link
        had, the current one's counted live."""
        w = self.writer
        if w is None:
            return dict(self._tun_drops)
        drops = dict(self._tun_drops)
        for why, count in w.drop_counts().items():
            drops[why] = drops.get(why, 0) + count
        return drops

    @property
    def packets_bytes_in(self) -> tuple[int, int]:
        """Packets and bytes written to the TUN, over every TUN this link had."""
        w = self.writer
        if w is None:
            return self._in_base
        return self._in_base[0] + w.packets, self._in_base[1] + w.bytes

    # ------------------------------------------------------------------ peers
    def peer_up(self, peer: Peer) -> None:
        """Bring `peer` up: the TUN if it is the first, its routes, its linkup hook.
        Raises OSError (TunError) when the TUN cannot be made."""
        cfg = self.config
        if self.tun is None:
            self._tun_up(peer)
        tun = self.tun
        assert tun is not None  # noqa: S101 — _tun_up raised otherwise
        if self.hub:
            for net in peer.networks:
                try:
                    tun.add_route(net)
                except TunError as exc:
                    log.error("%s: route %s not added: %s", peer.name, net, exc)
        else:
            if cfg.autoroute and cfg.mode == "client" and not cfg.is_serial:
                try:
                    pinned = tun.pin_route(ipaddress.ip_address(cfg.server_host))
                    if pinned:
                        log.info("autoroute: carrier route pinned: %s", pinned)
                except TunError as exc:
                    log.warning("autoroute: %s", exc)
            for route in cfg.routes:
                try:
                    tun.add_route(route.network, route.gateway)
                except TunError as exc:
                    log.error(
                        "route%d %s via %s not added: %s",
                        route.index,
                        route.network,
                        route.gateway,
                        exc,
                    )
        self.hooks.submit("linkup", cfg.linkup, self.hook_args(peer), self.hook_env(peer))
        self._linkup_ran.add(peer)
        self.up_count += 1

    def peer_down(self, peer: Peer, reason: str) -> None:
        """Undo `peer_up`, whatever part of it happened; the last peer down takes the TUN."""
        if peer in self._linkup_ran:
            self._linkup_ran.discard(peer)
            self.up_count -= 1
            self.hooks.submit(
                "linkdown",
                self.config.linkdown,
                self.hook_args(peer, reason),
                self.hook_env(peer),
            )
        if self.hub and self.tun is not None:
            for net in peer.networks:
                try:
                    self.tun.remove_route(net)
                except TunError as exc:
                    log.warning("%s: %s", peer.name, exc)
        if self.up_count <= 0:
            self.up_count = 0
            self._tun_down(peer)

    # ------------------------------------------------------------------ the TUN
    def _tun_up(self, peer: Peer) -> None:
        cfg = self.config
        tun = Tun.open(cfg.interface, offload=not cfg.is_serial)
        try:
            if cfg.carries_ipv6:
                _enable_ipv6(tun.name)
            else:
                _disable_ipv6(tun.name)
            extra = ((cfg.local6, cfg.remote6),) if cfg.local6 is not None else ()
            tun.configure(cfg.local, cfg.remote, cfg.mtu, extra)
        except OSError:
            tun.close()
            raise
        self.tun = tun
        self.writer = TunWriter(tun.fd, tun.hdr_len)
        self.hooks.submit("slipup", cfg.slipup, [tun.name], self._tun_env(peer))
        self._slipup_ran = True

    def _tun_down(self, peer: Peer) -> None:
        """Close the TUN (the kernel deletes it and its routes); slipdown after slipup."""
        self._unwatch()
        tun, self.tun = self.tun, None
        writer, self.writer = self.writer, None
        try:
            if writer is not None:
                drops = writer.close()
                self._in_base = (
                    self._in_base[0] + writer.packets,
                    self._in_base[1] + writer.bytes,
                )
                for why, count in drops.items():
                    self._tun_drops[why] = self._tun_drops.get(why, 0) + count
            if tun is not None:
                for problem in tun.remove_routes():
                    log.warning("removing %s", problem)
        finally:
            if tun is not None:
                tun.close()
                if self._slipup_ran:
                    self.hooks.submit(
                        "slipdown", self.config.slipdown, [tun.name], self._tun_env(peer)
                    )
            self._slipup_ran = False

    # ------------------------------------------------------------------ hooks
    def _tun_env(self, peer: Peer) -> dict[str, str]:
        """slipup/slipdown: a hub's interface belongs to no one client."""
        if not self.hub:
            return self.hook_env(peer)
        cfg = self.config
        env = {
            "VPND_INTERFACE": cfg.interface,
            "VPND_LOCAL": str(cfg.local),
            "VPND_MODE": cfg.mode,
            "VPND_CONFIG": cfg.source,
        }
        if cfg.local6 is not None:
            env["VPND_LOCAL6"] = str(cfg.local6)
        return env

    def hook_env(self, peer: Peer) -> dict[str, str]:
        """The environment of linkup/linkdown (docs/directives.md)."""
        cfg = self.config
        env = {
            "VPND_INTERFACE": cfg.interface,
            "VPND_LOCAL": str(cfg.local),
            "VPND_REMOTE": str(peer.address),
            "VPND_PEER": peer.endpoint or "",
            "VPND_MODE": cfg.mode,
            "VPND_CONFIG": cfg.source,
        }
        if cfg.local6 is not None:
            env["VPND_LOCAL6"] = str(cfg.local6)
        if peer.address6 is not None:
            env["VPND_REMOTE6"] = str(peer.address6)
        if self.hub:
            env["VPND_PEER_NAME"] = peer.name
        return env

    def hook_args(self, peer: Peer, reason: str | None = None) -> list[str]:
        """linkup: IFACE LOCAL REMOTE ENDPOINT; linkdown adds REASON; a hub adds the name."""
        cfg = self.config
        args = [cfg.interface, str(cfg.local), str(peer.address), peer.endpoint or ""]
        if reason is not None:
            args.append(reason)
        if self.hub:
            args.append(peer.name)
        return args


def _disable_ipv6(ifname: str) -> None:
    """The tunnel carries IPv4; without this the kernel sends IPv6 chatter that skews counters."""
    _sysctl(ifname, "disable_ipv6", "1")


def _enable_ipv6(ifname: str) -> None:
    """The tunnel carries IPv6: keep it on, but quiet. No link-local address (so no router
    solicitations or DAD from fe80::), no router advertisements taken from the far end: the
    tunnel's addresses and routes are the config's, nothing else. Set before the link is up."""
    _sysctl(ifname, "disable_ipv6", "0")
    _sysctl(ifname, "accept_ra", "0")
    _sysctl(ifname, "router_solicitations", "0")
    _sysctl(ifname, "addr_gen_mode", "1")


def _sysctl(ifname: str, name: str, value: str) -> None:
    path = f"/proc/sys/net/ipv6/conf/{ifname}/{name}"
    with contextlib.suppress(OSError), open(path, "w") as fh:
        fh.write(value)
