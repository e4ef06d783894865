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

from vpnctl.inventory import ROLES, Host, Inventory, Link, UserError
from vpnd_runtime.config import Config, ConfigError, parse_config

__all__ = [
    "MANIFEST",
    "Change",
    "CheckResult",
    "RenderError",
    "changed_paths",
    "check_build",
    "diff_build",
    "render",
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
        "server_address": str(inv.host(link.server.host).address),
        "local": str(me.tunnel),
        "remote": str(peer.tunnel),
        "interface": link.interface,
        "mtu": t.mtu,
        "keyfile": host.path("etc/vpnd", f"{link.name}.key"),
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
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_bytes(value: object) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def render(inv: Inventory, fingerprints: Mapping[str, str]) -> dict[str, bytes]:
    """Every file of the build directory: ``"<host>/<path>" -> bytes``.

    ``inv`` must have every tunnel address allocated (:func:`vpnctl.inventory.allocate_tunnels`);
    ``fingerprints`` maps each link name to its key fingerprint. Raises RenderError when a
    key is missing or the runtime parser refuses a rendered config.
    """
    env = _environment()
    conf_template = env.get_template("vpnd.conf.j2")
    unit_template = env.get_template("vpnd.service.j2")
    missing = [link.name for link in inv.links if link.name not in fingerprints]
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
                "config": context["config"],
                "keyfile": context["keyfile"],
                "pidfile": context["pidfile"],
                "statusfile": context["statusfile"],
                "key_fingerprint": fingerprints[link.name],
                "unit": unit,
                "files": {rel: _sha256(data) for rel, data in sorted(files.items())},
            }
    for name, manifest in manifests.items():
        out[f"{name}/{MANIFEST}"] = _json_bytes(manifest)
    return dict(sorted(out.items()))


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
    if s.is_serial != c.is_serial:
        bad("one side is serial, the other tcp")
    elif s.transport != c.transport:
        bad(f"transports differ: server {s.transport}, client {c.transport}")
    elif not s.is_serial:
        if s.server_port != c.server_port:
            bad(f"server listens on port {s.server_port}, client dials {c.server_port}")
        server_address = str(inv.host(link.server.host).address)
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
            if route.gateway != config.remote:
                bad(
                    f"{role} route{route.index} goes via {route.gateway}, not the peer "
                    f"{config.remote}"
                )
    fps = {s_entry.get("key_fingerprint"), c_entry.get("key_fingerprint")}
    if len(fps) != 1:
        bad(
            f"key fingerprints differ: server {s_entry.get('key_fingerprint')}, "
            f"client {c_entry.get('key_fingerprint')}"
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
    if expected is not None:
        for rel in changed_paths(expected, build):
            problems.append(f"{build / rel}: out of date with the inventory; run `vpnctl render`")
    return CheckResult(verified, problems)
