"""Render paired vpnd configs from the inventory, and prove that each pair mirrors.

Theory of operation
-------------------
:func:`render` is a pure function from (allocated inventory, key fingerprints) to a mapping
``relative path -> bytes`` below the build directory, laid out as docs/architecture.md
§Rendered output says::

    <host>/manifest.json                 host, address, prefix, systemd, runtime path, and per
                                         link: role, peer, config/keyfile/pidfile/statusfile
                                         paths on the host, key fingerprint, unit, sha256 of
                                         every rendered file
    <host>/etc/vpnd/<link>.conf          the runtime config (paths include the host's prefix)
    <host>/systemd/vpnd-<link>.service   unless the host has ``systemd: false``

Each link yields two configs from one Jinja template (StrictUndefined: a missing variable is
a bug, never an empty string): the server side (``server 0 <port>``, local = server tunnel
address) and the client side (``server <server underlay address> <port>``, local and remote
swapped). The networks behind one side become route1..9 on the other side, via the tunnel
peer. Every config is fed back through the runtime's own parser before anything is written.

Output is deterministic: no timestamps, sorted keys, inputs in inventory order, so the same
inputs give the same bytes. Keys are never rendered; the manifest names the key path on the
host and the fingerprint, and ``deploy`` copies the key from the keystore.

:func:`write_build` makes ``build/<host>/`` match the rendering exactly (unchanged files are
not rewritten); :func:`diff_build` shows what a render would change; :func:`check_build`
re-reads what is on disk and proves each pair mirrors.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from vpnctl.inventory import (
    ROLES,
    Host,
    Hub,
    HubClient,
    Inventory,
    Link,
    Tunables,
    UserError,
    hub_key_name,
)
from vpnctl.rotation import end_keys_of, manifest_fields
from vpnd_runtime.config import Config, ConfigError, PeerSpec, parse_config
from vpnd_runtime.peerfile import parse_peer

__all__ = [
    "MANIFEST",
    "Change",
    "CheckResult",
    "RenderError",
    "changed_paths",
    "check_build",
    "diff_build",
    "render",
    "session_fingerprint",
    "write_build",
]

MANIFEST = "manifest.json"
RUNTIME_PATH = "usr/local/bin/vpnd"  # below the host's prefix; where deploy installs vpnd


class RenderError(UserError):
    """Rendering failed (or a rendered config was refused by the runtime's parser)."""


@dataclass(frozen=True)
class Change:
    """One file that :func:`write_build` created, updated or removed (path below build/)."""

    action: str  # "created" | "updated" | "removed"
    path: str


def _num(value: float) -> str:
    """20.0 -> "20", 0.5 -> "0.5": seconds as the runtime parser reads them."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("vpnctl", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701
    )
    env.filters["num"] = _num
    return env


def _side_context(inv: Inventory, link: Link, role: str) -> dict[str, Any]:
    other = "client" if role == "server" else "server"
    me, peer = link.side(role), link.side(other)
    host = inv.host(me.host)
    t = link.tunables
    return {
        "inventory": Path(inv.file).name,
        "link": link.name,
        "role": role,
        "peer_role": other,
        "host": me.host,
        "peer": peer.host,
        "serial": link.transport == "serial",
        "device": me.device,
        "port": t.port,
        "server_address": dial_address(inv, link),
        "local": str(me.tunnel),
        "remote": str(peer.tunnel),
        "local6": str(me.tunnel6) if me.tunnel6 is not None else None,
        "remote6": str(peer.tunnel6) if peer.tunnel6 is not None else None,
        "interface": link.interface,
        "mtu": t.mtu,
        "keyfile": host.path("etc/vpnd", f"{link.name}.key"),
        "nextkey": None,  # set while a rotation is under way (vpnctl/rotation.py)
        "pidfile": host.path("run/vpnd", f"{link.name}.pid"),
        "statusfile": host.path("run/vpnd", f"{link.name}.status.json"),
        "keepalive": t.keepalive,
        "noanswer": t.noanswer,
        "maxdelay": t.maxdelay,
        "cipher": t.cipher,
        "keyttl": t.keyttl,
        "sendbuf": t.sendbuf,
        "compress": t.compress,
        "ipopts": t.ipopts if link.transport != "serial" else 0,
        "udp": link.transport == "udp",
        "speed": t.speed,
        "localline": t.localline,
        "nortscts": t.nortscts,
        "xfilter": t.xfilter,
        "modemchat": me.modemchat,
        "routes": list(peer.routes),
        "hooks": list(me.hooks),
        "config": host.path("etc/vpnd", f"{link.name}.conf"),
        "rundir": host.path("run/vpnd"),
        "runtime": host.path(RUNTIME_PATH),
        "user": host.run_as[0] if host.run_as else None,
        "group": host.run_as[1] if host.run_as else None,
        "hub": False,
    }


def _tunable_context(t: Tunables) -> dict[str, Any]:
    return {
        "port": t.port,
        "mtu": t.mtu,
        "keepalive": t.keepalive,
        "noanswer": t.noanswer,
        "maxdelay": t.maxdelay,
        "cipher": t.cipher,
        "keyttl": t.keyttl,
        "sendbuf": t.sendbuf,
        "compress": t.compress,
        "ipopts": t.ipopts,
        "udp": t.transport == "udp",
    }


def hub_peers_dir(hub: Hub) -> str:
    """The hub's peers directory below etc/vpnd: ``<hub>.peers``."""
    return f"{hub.name}.peers"


def _hub_context(inv: Inventory, hub: Hub) -> dict[str, Any]:
    """The hub's own config and unit: nothing in it depends on the client set, so adding or
    removing a client leaves both byte-identical (deploy then only reloads the hub)."""
    host = inv.host(hub.server)
    return {
        "inventory": Path(inv.file).name,
        "hub": hub.name,
        "link": hub.name,
        "role": "hub",
        "peer_role": "peers directory",
        "host": hub.server,
        "peer": "clients",
        "local": str(hub.tunnel),
        "local6": str(hub.tunnel6) if hub.tunnel6 is not None else None,
        "serial": False,  # a hub runs over TCP (the unit's device rules see this)
        "device": None,
        "peers": host.path("etc/vpnd", hub_peers_dir(hub)),
        "interface": hub.interface,
        "clienttoclient": hub.clienttoclient,
        "pidfile": host.path("run/vpnd", f"{hub.name}.pid"),
        "statusfile": host.path("run/vpnd", f"{hub.name}.status.json"),
        "hooks": list(hub.hooks),
        "config": host.path("etc/vpnd", f"{hub.name}.conf"),
        "rundir": host.path("run/vpnd"),
        "runtime": host.path(RUNTIME_PATH),
        "user": host.run_as[0] if host.run_as else None,
        "group": host.run_as[1] if host.run_as else None,
        **_tunable_context(hub.tunables),
    }


def _hub_client_context(inv: Inventory, hub: Hub, client: HubClient) -> dict[str, Any]:
    """The client side of one hub client: an ordinary client config (HUB-SPEC.md) whose
    routes are the hub's network (unless clienttoclient is off) and the networks behind the
    hub, via the hub's address."""
    host = inv.host(client.host)
    own = [n for n in (hub.network, hub.network6) if n is not None] if hub.clienttoclient else []
    routes = own + list(hub.routes)
    return {
        "inventory": Path(inv.file).name,
        "link": hub.name,
        "role": "client",
        "peer_role": "hub",
        "host": client.host,
        "peer": hub.server,
        "serial": False,
        "device": None,
        "server_address": _dial(inv.host(hub.server), host),
        "local": str(client.tunnel),
        "remote": str(hub.tunnel),
        "local6": str(client.tunnel6) if client.tunnel6 is not None else None,
        "remote6": str(hub.tunnel6) if hub.tunnel6 is not None else None,
        "interface": hub.interface,
        "keyfile": host.path("etc/vpnd", f"{hub.name}.key"),
        "nextkey": None,
        "pidfile": host.path("run/vpnd", f"{hub.name}.pid"),
        "statusfile": host.path("run/vpnd", f"{hub.name}.status.json"),
        "speed": 0,
        "localline": False,
        "nortscts": False,
        "xfilter": False,
        "modemchat": None,
        "routes": routes,
        "hooks": list(hub.client_hooks),
        "config": host.path("etc/vpnd", f"{hub.name}.conf"),
        "rundir": host.path("run/vpnd"),
        "runtime": host.path(RUNTIME_PATH),
        "user": host.run_as[0] if host.run_as else None,
        "group": host.run_as[1] if host.run_as else None,
        "hub": False,
        **_tunable_context(hub.tunables),
    }


def session_fingerprint(entry: Mapping[str, Any]) -> Any:
    """The key a link end's session should use, from its manifest entry: its key, or while a
    rotation is under way the phase's session key (the two ends' primary keys may differ)."""
    return entry.get("session_key_fingerprint", entry.get("key_fingerprint"))


def dial_address(inv: Inventory, link: Link) -> str:
    """The server address the client dials: the server's first underlay address of a family
    the client host has (an IPv6-only client dials a dual-stack server's ``address6``)."""
    return _dial(inv.host(link.server.host), inv.host(link.client.host))


def _dial(server: Host, client: Host) -> str:
    families = {a.version for a in client.addresses}
    chosen = next((a for a in server.addresses if a.version in families), server.address)
    return str(chosen)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_bytes(value: object) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def render(
    inv: Inventory,
    fingerprints: Mapping[str, str],
    rotations: Mapping[str, tuple[str, str | None]] | None = None,
) -> dict[str, bytes]:
    """Every file of the build directory: ``"<host>/<path>" -> bytes``.

    ``inv`` must have every tunnel address allocated (:func:`vpnctl.inventory.allocate_tunnels`);
    ``fingerprints`` maps each link name to its key fingerprint. ``rotations`` maps a key under
    rotation to (phase, staged key's fingerprint): its ends get a ``nextkey`` and the primary
    key of that phase (vpnctl/rotation.py). Raises RenderError when a key is missing or the
    runtime parser refuses a rendered config.
    """
    rotations = rotations or {}
    env = _environment()
    conf_template = env.get_template("vpnd.conf.j2")
    unit_template = env.get_template("vpnd.service.j2")
    missing = [name for name in inv.key_names() if name not in fingerprints]
    if missing:
        raise RenderError(f"no key for link(s) {', '.join(missing)}; run `vpnctl keygen` first")
    out: dict[str, bytes] = {}
    manifests: dict[str, dict[str, Any]] = {host.name: _manifest_head(host) for host in inv.hosts}
    for link in inv.links:
        for role in ROLES:
            if link.side(role).tunnel is None:
                raise RenderError(f"link {link.name!r} has no tunnel addresses (not allocated)")
        for role in ROLES:
            side = link.side(role)
            host = inv.host(side.host)
            context = _side_context(inv, link, role)
            conf_rel = f"etc/vpnd/{link.name}.conf"
            keys = end_keys_of(link.name, role, fingerprints, rotations)
            keyless = conf_template.render(context).encode() if keys.next else None
            if keys.next:
                context["nextkey"] = host.path("etc/vpnd", f"{link.name}.next.key")
            conf = conf_template.render(context).encode()
            _self_check(conf, f"build/{host.name}/{conf_rel}")
            files = {conf_rel: conf}
            unit = None
            if host.systemd is not False:
                unit = f"vpnd-{link.name}.service"
                files[f"systemd/{unit}"] = unit_template.render(context).encode()
            for rel, data in files.items():
                out[f"{host.name}/{rel}"] = data
            manifests[host.name]["links"][link.name] = {
                "role": role,
                "peer": link.side("client" if role == "server" else "server").host,
                "transport": link.transport,
                "interface": link.interface,
                "local": str(side.tunnel),
                **({"local6": str(side.tunnel6)} if side.tunnel6 is not None else {}),
                "config": context["config"],
                "keyfile": context["keyfile"],
                "pidfile": context["pidfile"],
                "statusfile": context["statusfile"],
                "key_fingerprint": keys.primary,
                **manifest_fields(keys, context["nextkey"], keyless),
                "unit": unit,
                "files": {rel: _sha256(data) for rel, data in sorted(files.items())},
            }
    for hub in inv.hubs:
        _render_hub(inv, hub, fingerprints, env, out=out, manifests=manifests,
                    rotations=rotations)  # fmt: skip
    for name, manifest in manifests.items():
        out[f"{name}/{MANIFEST}"] = _json_bytes(manifest)
    return dict(sorted(out.items()))


def _render_hub(
    inv: Inventory,
    hub: Hub,
    fingerprints: Mapping[str, str],
    env: jinja2.Environment,
    *,
    out: dict[str, bytes],
    manifests: dict[str, dict[str, Any]],
    rotations: Mapping[str, tuple[str, str | None]],
) -> None:
    """The hub's config, unit and peers directory (one ``<client>.peer`` each) on its host, and
    one client config (and unit) per client host; every file passes the runtime's parser."""
    if hub.network is None or any(c.tunnel is None for c in hub.clients):
        raise RenderError(f"hub {hub.name!r} has no tunnel addresses (not allocated)")
    host = inv.host(hub.server)
    context = _hub_context(inv, hub)
    conf_rel = f"etc/vpnd/{hub.name}.conf"
    conf = env.get_template("hub.conf.j2").render(context).encode()
    _self_check_hub(conf, f"build/{host.name}/{conf_rel}")
    files = {conf_rel: conf}
    unit = None
    if host.systemd is not False:
        unit = f"vpnd-{hub.name}.service"
        files[f"systemd/{unit}"] = env.get_template("vpnd.service.j2").render(context).encode()
    peer_template = env.get_template("hub.peer.j2")
    clients: dict[str, Any] = {}
    for client in hub.clients:
        key = hub_key_name(hub.name, client.name)
        peer_rel = f"etc/vpnd/{hub_peers_dir(hub)}/{client.name}.peer"
        keyfile = host.path("etc/vpnd", hub_peers_dir(hub), f"{client.name}.key")
        keys = end_keys_of(key, "hub", fingerprints, rotations)
        nextkey = (
            host.path("etc/vpnd", hub_peers_dir(hub), f"{client.name}.next.key")
            if keys.next
            else None
        )
        peer = peer_template.render(
            inventory=Path(inv.file).name,
            hub=hub.name,
            client=client.name,
            client_address=str(inv.host(client.host).address),
            address=str(client.tunnel),
            address6=str(client.tunnel6) if client.tunnel6 is not None else None,
            keyfile=keyfile,
            nextkey=nextkey,
            routes=list(client.routes),
        ).encode()
        _self_check_peer(peer, f"build/{host.name}/{peer_rel}")
        files[peer_rel] = peer
        clients[client.name] = {
            "host": client.host,
            "address": str(client.tunnel),
            **({"address6": str(client.tunnel6)} if client.tunnel6 is not None else {}),
            "key": key,
            "key_fingerprint": keys.primary,
            **manifest_fields(keys, nextkey, None),
            "peerfile": host.path(peer_rel),
            "keyfile": keyfile,
            "routes": [str(net) for net in client.routes],
        }
    for rel, data in files.items():
        out[f"{host.name}/{rel}"] = data
    manifests[host.name]["links"][hub.name] = {
        "role": "hub",
        "peer": None,
        "transport": "tcp",
        "interface": hub.interface,
        "local": str(hub.tunnel),
        "network": str(hub.network),
        **(
            {"local6": str(hub.tunnel6), "network6": str(hub.network6)}
            if hub.network6 is not None
            else {}
        ),
        "clienttoclient": hub.clienttoclient,
        "config": context["config"],
        "peers": context["peers"],
        "keyfile": None,
        "pidfile": context["pidfile"],
        "statusfile": context["statusfile"],
        "key_fingerprint": None,
        "unit": unit,
        "clients": clients,
        "files": {rel: _sha256(data) for rel, data in sorted(files.items())},
    }

    conf_template = env.get_template("vpnd.conf.j2")
    unit_template = env.get_template("vpnd.service.j2")
    for client in hub.clients:
        chost = inv.host(client.host)
        ccontext = _hub_client_context(inv, hub, client)
        crel = f"etc/vpnd/{hub.name}.conf"
        key = hub_key_name(hub.name, client.name)
        ckeys = end_keys_of(key, "client", fingerprints, rotations)
        ckeyless = conf_template.render(ccontext).encode() if ckeys.next else None
        if ckeys.next:
            ccontext["nextkey"] = chost.path("etc/vpnd", f"{hub.name}.next.key")
        cconf = conf_template.render(ccontext).encode()
        _self_check(cconf, f"build/{chost.name}/{crel}")
        cfiles = {crel: cconf}
        cunit = None
        if chost.systemd is not False:
            cunit = f"vpnd-{hub.name}.service"
            cfiles[f"systemd/{cunit}"] = unit_template.render(ccontext).encode()
        for rel, data in cfiles.items():
            out[f"{chost.name}/{rel}"] = data
        manifests[chost.name]["links"][hub.name] = {
            "role": "client",
            "peer": hub.server,
            "hub": hub.name,
            "key": key,
            "transport": "tcp",
            "interface": hub.interface,
            "local": str(client.tunnel),
            "config": ccontext["config"],
            "keyfile": ccontext["keyfile"],
            "pidfile": ccontext["pidfile"],
            "statusfile": ccontext["statusfile"],
            "key_fingerprint": ckeys.primary,
            **manifest_fields(ckeys, ccontext["nextkey"], ckeyless),
            "unit": cunit,
            "files": {rel: _sha256(data) for rel, data in sorted(cfiles.items())},
        }


def _manifest_head(host: Host) -> dict[str, Any]:
    return {
        "version": 1,
        "host": host.name,
        "address": str(host.address),
        "prefix": host.prefix,
        "systemd": "auto" if host.systemd is None else host.systemd,
        "runtime": host.path(RUNTIME_PATH),
        "run_as": list(host.run_as) if host.run_as else None,  # deploy creates this account
        "links": {},
    }


def _self_check(conf: bytes, where: str) -> Config:
    try:
        return parse_config(conf.decode(), where)
    except ConfigError as exc:
        raise RenderError(f"the runtime parser refuses a rendered config:\n{exc}") from None


def _self_check_hub(conf: bytes, where: str) -> None:
    """Feed a rendered hub config through the runtime's parser; it must come out a hub."""
    config = _self_check(conf, where)
    if not config.is_hub:
        raise RenderError(f"{where}: the runtime does not read this config as a hub")


def _parse_peer(text: str, where: str) -> PeerSpec:
    """A peer file through the runtime's own peer-file parser (its name from the file name)."""
    return parse_peer(text, where, Path(where).stem, default_keyfile="(the hub's keyfile)")


def _self_check_peer(data: bytes, where: str) -> None:
    """Feed a rendered peer file through the runtime's peer-file parser."""
    try:
        _parse_peer(data.decode(), where)
    except ConfigError as exc:
        raise RenderError(f"the runtime parser refuses a rendered peer file:\n{exc}") from None


# --------------------------------------------------------------------------------------------
# The build directory


def _existing(build: Path, hosts: list[str]) -> dict[str, bytes]:
    """Files currently under ``build/<host>/`` for ``hosts`` (plus stale rendered hosts)."""
    found: dict[str, bytes] = {}
    if not build.is_dir():
        return found
    names = set(hosts) | {p.parent.name for p in build.glob(f"*/{MANIFEST}")}
    for name in sorted(names):
        root = build / name
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.name.startswith(".vpnctl-tmp"):
                found[path.relative_to(build).as_posix()] = path.read_bytes()
    return found


def write_build(files: Mapping[str, bytes], build: str | Path) -> list[Change]:
    """Make ``build`` hold exactly ``files`` for the rendered hosts; return what changed.

    Unchanged files are left alone (same bytes, same mtime); files of a rendered host (or of a
    host removed from the inventory) that are no longer rendered are deleted. Each file is
    written to a temporary name and renamed, so a reader never sees half a file.
    """
    build = Path(build)
    hosts = sorted({rel.split("/", 1)[0] for rel in files})
    old = _existing(build, hosts)
    changes: list[Change] = []
    for rel, data in files.items():
        if old.get(rel) == data:
            continue
        path = build / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".vpnctl-tmp-{path.name}")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)
        tmp.replace(path)
        changes.append(Change("updated" if rel in old else "created", rel))
    for rel in sorted(set(old) - set(files)):
        (build / rel).unlink()
        changes.append(Change("removed", rel))
    for name in sorted({rel.split("/", 1)[0] for rel in old} - set(hosts)):
        shutil.rmtree(build / name, ignore_errors=True)
    for host in hosts:  # drop directories emptied by removals
        for directory in sorted((build / host).rglob("*"), reverse=True):
            if directory.is_dir():
                with contextlib.suppress(OSError):
                    directory.rmdir()
    return changes


def changed_paths(files: Mapping[str, bytes], build: str | Path) -> list[str]:
    """Paths below ``build`` that a :func:`write_build` of ``files`` would create, change or
    remove."""
    hosts = sorted({rel.split("/", 1)[0] for rel in files})
    old = _existing(Path(build), hosts)
    return sorted(rel for rel in set(old) | set(files) if old.get(rel) != files.get(rel))


def diff_build(files: Mapping[str, bytes], build: str | Path) -> str:
    """A unified diff from what is under ``build`` to ``files`` ("" when nothing changes)."""
    build = Path(build)
    old = _existing(build, sorted({rel.split("/", 1)[0] for rel in files}))
    chunks: list[str] = []
    for rel in sorted(set(old) | set(files)):
        before, after = old.get(rel), files.get(rel)
        if before == after:
            continue
        a = before.decode(errors="replace").splitlines(keepends=True) if before else []
        b = after.decode(errors="replace").splitlines(keepends=True) if after else []
        label_a = f"a/{build.name}/{rel}" if before is not None else "/dev/null"
        label_b = f"b/{build.name}/{rel}" if after is not None else "/dev/null"
        chunks.extend(difflib.unified_diff(a, b, label_a, label_b))
        if chunks and not chunks[-1].endswith("\n"):
            chunks[-1] += "\n\\ No newline at end of file\n"
    return "".join(chunks)


# --------------------------------------------------------------------------------------------
# The mirror check


@dataclass(frozen=True)
class CheckResult:
    """What :func:`check_build` found: one line per verified link, and the problems."""

    verified: list[str]
    problems: list[str]

    @property
    def ok(self) -> bool:
        """True when every link mirrors and the build is up to date."""
        return not self.problems


def _load_manifest(build: Path, host: str, problems: list[str]) -> dict[str, Any] | None:
    path = build / host / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"{path}: missing; run `vpnctl render`")
        return None
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: unreadable manifest: {exc}")
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("links"), dict):
        problems.append(f"{path}: not a vpnctl manifest")
        return None
    for name, entry in manifest["links"].items():
        for rel, digest in dict(entry.get("files", {})).items():
            file = build / host / rel
            try:
                actual = _sha256(file.read_bytes())
            except OSError:
                problems.append(f"{file}: listed in the manifest of link {name!r} but missing")
                continue
            if actual != digest:
                problems.append(f"{file}: sha256 differs from {path} (edited by hand?)")
    return manifest


def _parse_side(build: Path, host: str, link: str, problems: list[str]) -> Config | None:
    path = build / host / "etc" / "vpnd" / f"{link}.conf"
    try:
        return parse_config(path.read_text(encoding="utf-8"), str(path))
    except OSError as exc:
        problems.append(f"{path}: cannot read: {exc.strerror}")
    except ConfigError as exc:
        problems.append(str(exc))
    return None


def _mirror_problems(
    inv: Inventory,
    link: Link,
    sides: Mapping[str, tuple[Mapping[str, Any], Config]],
    keystore_fp: str | None,
) -> list[str]:
    """Every way the two rendered sides of ``link`` fail to mirror each other."""
    (s_entry, s), (c_entry, c) = sides["server"], sides["client"]
    found: list[str] = []
    bad = found.append
    if s.mode != "server" or c.mode != "client":
        bad(f"modes are {s.mode}/{c.mode}, expected server/client")
    if (s.local, s.remote) != (c.remote, c.local):
        bad(
            f"tunnel addresses do not mirror: server {s.local}->{s.remote}, "
            f"client {c.local}->{c.remote}"
        )
    if (s.local6, s.remote6) != (c.remote6, c.local6):
        bad(
            f"IPv6 tunnel addresses do not mirror: server {s.local6}->{s.remote6}, "
            f"client {c.local6}->{c.remote6}"
        )
    if s.is_serial != c.is_serial:
        bad("one side is serial, the other tcp")
    elif s.transport != c.transport:
        bad(f"transports differ: server {s.transport}, client {c.transport}")
    elif not s.is_serial:
        if s.server_port != c.server_port:
            bad(f"server listens on port {s.server_port}, client dials {c.server_port}")
        server_address = dial_address(inv, link)
        if c.server_host != server_address:
            bad(f"client dials {c.server_host}, the server's address is {server_address}")
        if s.server_host not in ("0.0.0.0", server_address):
            bad(f"server listens on {s.server_host}, not on {server_address} or any")
    else:
        for name in ("speed", "xfilter"):
            if getattr(s, name) != getattr(c, name):
                bad(f"{name} differs: server {getattr(s, name)}, client {getattr(c, name)}")
    for name in (
        "keepalive",
        "noanswer",
        "compress",
        "compress_level",
        "cipher",
        "mtu",
        "keyttl",
        "keysize",
        "maxdelay",
    ):
        if getattr(s, name) != getattr(c, name):
            bad(f"{name} differs: server {getattr(s, name)}, client {getattr(c, name)}")
    for config, role in ((s, "server"), (c, "client")):
        for route in config.routes:
            if route.gateway not in config.remote_addresses:
                bad(
                    f"{role} route{route.index} goes via {route.gateway}, not the peer "
                    f"{' or '.join(map(str, config.remote_addresses))}"
                )
    fps = {session_fingerprint(s_entry), session_fingerprint(c_entry)}
    if len(fps) != 1:
        bad(
            f"key fingerprints differ: server {session_fingerprint(s_entry)}, "
            f"client {session_fingerprint(c_entry)}"
        )
    elif keystore_fp not in fps:
        bad(f"rendered with key {fps.pop()}, the keystore holds {keystore_fp}; run `vpnctl render`")
    return found


def check_build(
    inv: Inventory,
    fingerprints: Mapping[str, str],
    build: str | Path,
    expected: Mapping[str, bytes] | None,
) -> CheckResult:
    """Prove that every link's two rendered configs under ``build`` mirror each other.

    For each link of ``inv``: both sides are rendered, parse with the runtime's parser,
    have the right modes, swapped local/remote addresses, the same transport, port, cipher,
    MTU, key lifetime, keepalive/noanswer and compression, routes via the peer, the client
    dials the server's address, and both manifests carry the keystore's key fingerprint.
    With ``expected`` (a fresh :func:`render`), also report files that are out of date.
    """
    build = Path(build)
    problems: list[str] = []
    verified: list[str] = []
    manifests = {host.name: _load_manifest(build, host.name, problems) for host in inv.hosts}
    for link in inv.links:
        sides: dict[str, tuple[Mapping[str, Any], Config]] = {}
        for role in ROLES:
            host = link.side(role).host
            manifest = manifests.get(host)
            if manifest is None:
                continue
            entry = manifest["links"].get(link.name)
            if entry is None:
                problems.append(f"{build / host / MANIFEST}: no {role} side of link {link.name!r}")
                continue
            if entry.get("role") != role:
                problems.append(
                    f"{build / host / MANIFEST}: link {link.name!r} is rendered as "
                    f"{entry.get('role')!r}, the inventory says {role}"
                )
                continue
            config = _parse_side(build, host, link.name, problems)
            if config is not None:
                sides[role] = (entry, config)
        if len(sides) != 2:
            continue
        (s_entry, s), (_, c) = sides["server"], sides["client"]
        found = _mirror_problems(inv, link, sides, fingerprints.get(link.name))
        problems.extend(f"link {link.name}: {what}" for what in found)
        if not found:
            transport = "serial" if s.is_serial else f"{s.transport}/{s.server_port}"
            verified.append(
                f"{link.name}: {link.server.host} {s.local} <-> {c.local} {link.client.host}  "
                f"{transport}  key {s_entry['key_fingerprint']}"
            )
    for hub in inv.hubs:
        _check_hub(
            inv, hub, fingerprints, build, manifests=manifests, verified=verified, problems=problems
        )
    if expected is not None:
        for rel in changed_paths(expected, build):
            problems.append(f"{build / rel}: out of date with the inventory; run `vpnctl render`")
    return CheckResult(verified, problems)


# --------------------------------------------------------------------------------------------
# The hub pairing check

_MIRRORED = ("keepalive", "noanswer", "maxdelay", "cipher", "keyttl", "mtu", "compress")


def _directives(text: str) -> dict[str, list[str]]:
    """``directive -> arguments`` of a vpnd config or peer file (comments and blanks skipped):
    enough to compare the two ends textually once the runtime parser has accepted them."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            out.setdefault(words[0], words[1:])
    return out


def _read(path: Path, problems: list[str]) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        problems.append(f"{path}: cannot read: {exc.strerror}")
        return None


def _check_hub(
    inv: Inventory,
    hub: Hub,
    fingerprints: Mapping[str, str],
    build: Path,
    *,
    manifests: Mapping[str, Mapping[str, Any] | None],
    verified: list[str],
    problems: list[str],
) -> None:
    """Prove that every client of ``hub`` pairs with it: the hub's peer file for the client and
    the client's config name the same addresses (mirrored), the client dials the hub's address
    and port, both ends carry the keystore's key for the pair, liveness/cipher settings agree,
    and the client's routes go via the hub's address."""
    manifest = manifests.get(hub.server)
    if manifest is None:
        return
    entry = manifest["links"].get(hub.name)
    where = build / hub.server / MANIFEST
    if entry is None or entry.get("role") != "hub":
        problems.append(f"{where}: no hub {hub.name!r} (role hub) on {hub.server}")
        return
    conf_path = build / hub.server / "etc" / "vpnd" / f"{hub.name}.conf"
    text = _read(conf_path, problems)
    if text is None:
        return
    try:
        parse_config(text, str(conf_path))
    except ConfigError as exc:
        problems.append(str(exc))
        return
    hub_conf = _directives(text)
    hub_local = (hub_conf.get("local") or ["?"])[0]
    hub_local6 = (hub_conf.get("local6") or [None])[0]
    hub_port = (hub_conf.get("server") or ["?", "?"])[-1]
    if hub_conf.get("mode") != ["server"] or "peers" not in hub_conf:
        problems.append(f"{conf_path}: not a hub config (mode server with peers)")
        return
    for client in hub.clients:
        name = f"hub {hub.name} client {client.name}"
        found: list[str] = []
        bad = found.append
        hub_view = entry.get("clients", {}).get(client.name)
        cmanifest = manifests.get(client.host)
        centry = None if cmanifest is None else cmanifest["links"].get(hub.name)
        if hub_view is None:
            problems.append(f"{where}: hub {hub.name!r} has no client {client.name!r}")
            continue
        if centry is None or centry.get("role") != "client":
            if cmanifest is not None:
                problems.append(f"{build / client.host / MANIFEST}: no client side of hub "
                                f"{hub.name!r}")  # fmt: skip
            continue
        peer_path = build / hub.server / "etc" / "vpnd" / hub_peers_dir(hub) / f"{client.name}.peer"
        peer_text = _read(peer_path, problems)
        config = _parse_side(build, client.host, hub.name, problems)
        if peer_text is None or config is None:
            continue
        try:
            _parse_peer(peer_text, str(peer_path))
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        peer = _directives(peer_text)
        peer_remote = (peer.get("remote") or ["?"])[0]
        peer_remote6 = (peer.get("remote6") or [None])[0]
        server_address = _dial(inv.host(hub.server), inv.host(client.host))
        six = (config.local6, config.remote6)
        if (None if six[0] is None else str(six[0]), None if six[1] is None else str(six[1])) != (
            peer_remote6,
            hub_local6,
        ):
            bad(f"IPv6 tunnel addresses do not mirror: hub {hub_local6}, peer file remote6 "
                f"{peer_remote6}; client {six[0]}->{six[1]}")  # fmt: skip
        if config.mode != "client":
            bad(f"the client config is mode {config.mode}, expected client")
        if (str(config.local), str(config.remote)) != (peer_remote, hub_local):
            bad(f"tunnel addresses do not mirror: hub {hub_local}, peer file remote "
                f"{peer_remote}; client {config.local}->{config.remote}")  # fmt: skip
        if config.server_host != server_address:
            bad(f"client dials {config.server_host}, the hub's address is {server_address}")
        if str(config.server_port) != hub_port:
            bad(f"hub listens on port {hub_port}, client dials {config.server_port}")
        client_conf = _directives(_read(build / client.host / "etc" / "vpnd" /
                                        f"{hub.name}.conf", problems) or "")  # fmt: skip
        for directive in _MIRRORED:
            if hub_conf.get(directive) != client_conf.get(directive):
                have = " ".join(hub_conf.get(directive, ["(none)"]))
                want = " ".join(client_conf.get(directive, ["(none)"]))
                bad(f"{directive} differs: hub {have}, client {want}")
        if peer.get("keyfile", [None])[0] != hub_view.get("keyfile"):
            bad(f"peer file keyfile {peer.get('keyfile')} is not {hub_view.get('keyfile')}")
        for route in config.routes:
            if str(route.gateway) not in (hub_local, hub_local6):
                bad(f"client route{route.index} goes via {route.gateway}, not the hub {hub_local}")
        for directive, args in peer.items():
            if directive.startswith("route") and args[-1:] not in ([peer_remote], [peer_remote6]):
                bad(f"peer file {directive} goes via {args[-1:]}, not the client {peer_remote}")
        if (
            hub.clienttoclient
            and hub.network is not None
            and not any(route.network == hub.network for route in config.routes)
        ):
            bad(f"the client has no route to the hub's network {hub.network}")
        key = hub_key_name(hub.name, client.name)
        fps = {session_fingerprint(hub_view), session_fingerprint(centry)}
        if len(fps) != 1:
            bad(f"key fingerprints differ: hub {session_fingerprint(hub_view)}, client "
                f"{session_fingerprint(centry)}")  # fmt: skip
        elif fingerprints.get(key) not in fps:
            bad(f"rendered with key {fps.pop()}, the keystore holds {fingerprints.get(key)}; "
                "run `vpnctl render`")  # fmt: skip
        problems.extend(f"{name}: {what}" for what in found)
        if not found:
            verified.append(
                f"{hub.name}/{client.name}: hub {hub.server} {hub_local} <-> {config.local} "
                f"{client.host}  tcp/{hub_port}  key {hub_view['key_fingerprint']}"
            )
