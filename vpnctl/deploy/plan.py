"""Phase 2, probe and plan: read the probe's answer, refuse a host deploy cannot work on, and
compare the desired files with the host's copies (pure)."""

from __future__ import annotations

import base64
import contextlib
import difflib
import hashlib
import json
import posixpath
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vpnctl.deploy.common import (
    STATE_DIR,
    UNIT_DIR,
    DeployError,
    DesiredFile,
    HostOutcome,
    HostPlan,
    RemoteState,
)
from vpnctl.deploy.runtime import MIN_PYTHON, parse_target
from vpnctl.keystore import Keystore


def load_manifest(build: Path, host: str) -> dict[str, Any]:
    """``build/<host>/manifest.json``; DeployError names the file when missing or damaged."""
    path = build / host / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DeployError(f"{path}: not rendered; run `vpnctl render` first") from exc
    except (OSError, ValueError) as exc:
        raise DeployError(f"{path}: unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("links"), dict):
        raise DeployError(f"{path}: not a vpnctl manifest (no 'links')")
    _check_manifest(path, manifest)
    return manifest


_MANIFEST_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


_MANIFEST_PATH = re.compile(r"/[A-Za-z0-9_./-]*")


_ACCOUNT = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


def _check_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    """Names and paths from a manifest go into remote shell lines and systemd units: refuse
    anything but the plain names and paths `vpnctl render` writes (DeployError names the field)."""
    prefix = manifest.get("prefix")
    if not isinstance(prefix, str) or not _MANIFEST_PATH.fullmatch(prefix):
        raise DeployError(f"{path}: prefix {prefix!r} is not a plain absolute path")
    run_as = manifest.get("run_as")
    if run_as is not None and not (
        isinstance(run_as, list)
        and len(run_as) == 2
        and all(isinstance(n, str) and _ACCOUNT.fullmatch(n) for n in run_as)
    ):
        raise DeployError(f"{path}: run_as {run_as!r} is not [user, group] of plain names")
    for link, entry in manifest["links"].items():
        if not _MANIFEST_NAME.fullmatch(str(link)) or not isinstance(entry, dict):
            raise DeployError(f"{path}: link name {link!r} is not a valid link name")
        peer = entry.get("peer")
        if peer is not None and not _MANIFEST_NAME.fullmatch(str(peer)):
            raise DeployError(f"{path}: links.{link}.peer {peer!r} is not a valid host name")
        hub = entry.get("role") == "hub"
        key_name = entry.get("key")
        if key_name is not None and not _MANIFEST_KEY.fullmatch(str(key_name)):
            raise DeployError(f"{path}: links.{link}.key {key_name!r} is not a key name")
        if hub:
            _check_hub_entry(path, link, entry)
        for key in ("config", "pidfile", "statusfile", *(() if hub else ("keyfile",))):
            value = entry.get(key)
            if not isinstance(value, str) or not _MANIFEST_PATH.fullmatch(value):
                raise DeployError(f"{path}: links.{link}.{key} {value!r} is not a plain "
                                  "absolute path")  # fmt: skip


_MANIFEST_KEY = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}(?:\.[a-z0-9][a-z0-9_-]{0,62})?")


def _check_hub_entry(path: Path, link: str, entry: Mapping[str, Any]) -> None:
    """A hub's entry: its peers directory and each client's name, key name and paths."""
    peers = entry.get("peers")
    if not isinstance(peers, str) or not _MANIFEST_PATH.fullmatch(peers):
        raise DeployError(f"{path}: links.{link}.peers {peers!r} is not a plain absolute path")
    clients = entry.get("clients")
    if not isinstance(clients, dict):
        raise DeployError(f"{path}: links.{link}.clients is not a mapping")
    for name, client in clients.items():
        if not _MANIFEST_NAME.fullmatch(str(name)) or not isinstance(client, dict):
            raise DeployError(f"{path}: links.{link}.clients: {name!r} is not a client name")
        if not _MANIFEST_KEY.fullmatch(str(client.get("key"))):
            raise DeployError(f"{path}: links.{link}.clients.{name}.key is not a key name")
        for key in ("peerfile", "keyfile"):
            value = client.get(key)
            if not isinstance(value, str) or not _MANIFEST_PATH.fullmatch(value):
                raise DeployError(f"{path}: links.{link}.clients.{name}.{key} {value!r} is not a "
                                  "plain absolute path")  # fmt: skip


def _key_file(
    keystore: Keystore,
    name: str,
    fingerprint: object,
    where: str,
    passphrase: bytes | None,
) -> tuple[bytes, float]:
    """The runtime key file of keystore key `name` (and its creation time) whose fingerprint
    is `fingerprint`: the current key, or during a rotation (`vpnctl rotate`) the staged one;
    refused when the build was rendered for another key."""
    info = keystore.info(name)
    if info is None:
        raise DeployError(f"{keystore.root}: no key for link {name!r}; run `vpnctl keygen`")
    if info.fingerprint != fingerprint:
        staged = keystore.info(name, staged=True)
        if staged is not None and staged.fingerprint == fingerprint:
            key = keystore.load(name, passphrase=passphrase, staged=True)
            return (key.hex() + "\n").encode("ascii"), staged.created
        raise DeployError(
            f"{where}: link {name!r} was rendered for key {fingerprint} but the keystore holds "
            f"{info.fingerprint}; re-run `vpnctl render`"
        )
    return keystore.key_file_bytes(name, passphrase=passphrase), info.created


def desired_files(
    build: Path,
    manifest: Mapping[str, Any],
    keystore: Keystore,
    *,
    use_systemd: bool,
    passphrase: bytes | None = None,
) -> list[DesiredFile]:
    """Every file a host should have: config, key and (under systemd) unit of each link.

    Rendered files are read from ``build/<host>/`` and checked against the manifest's sha256, so
    a build edited by hand after render is refused with the file's name.
    """
    host = manifest["host"]
    out: list[DesiredFile] = []
    for link, entry in sorted(manifest["links"].items()):
        for rel, digest in sorted(entry.get("files", {}).items()):
            local = build / host / rel
            try:
                data = local.read_bytes()
            except OSError as exc:
                raise DeployError(f"{local}: listed in the manifest but unreadable: {exc}") from exc
            if hashlib.sha256(data).hexdigest() != digest:
                raise DeployError(
                    f"{local}: does not match its sha256 in {build / host / 'manifest.json'}; "
                    "re-run `vpnctl render` (do not edit build/ by hand)"
                )
            if entry.get("role") == "hub" and rel.endswith(".peer"):
                client = entry["clients"].get(Path(rel).stem)
                if client is None:
                    raise DeployError(f"{local}: not a client of hub {link!r} in the manifest")
                out.append(DesiredFile(client["peerfile"], data, 0o644, link, "peer"))
            elif rel.startswith("etc/vpnd/"):
                out.append(DesiredFile(entry["config"], data, 0o644, link, "config"))
            elif rel.startswith("systemd/") and use_systemd:
                out.append(DesiredFile(posixpath.join(UNIT_DIR, Path(rel).name), data, 0o644,
                                       link, "unit"))  # fmt: skip
        where = str(build / host / "manifest.json")
        if entry.get("role") == "hub":  # one key per client, in the peers directory
            for _name, client in sorted(entry["clients"].items()):
                key, created = _key_file(keystore, client["key"], client.get("key_fingerprint"),
                                         where, passphrase)  # fmt: skip
                out.append(DesiredFile(client["keyfile"], key, 0o600, link, "peerkey",
                                       mtime=created))  # fmt: skip
                if client.get("nextkeyfile"):  # a rotation under way: the key also accepted
                    key, created = _key_file(
                        keystore,
                        client["key"],
                        client.get("next_key_fingerprint"),
                        where,
                        passphrase,
                    )
                    out.append(DesiredFile(client["nextkeyfile"], key, 0o600, link,
                                           "peernextkey", mtime=created))  # fmt: skip
            continue
        key, created = _key_file(keystore, entry.get("key", link), entry.get("key_fingerprint"),
                                 where, passphrase)  # fmt: skip
        out.append(DesiredFile(entry["keyfile"], key, 0o600, link, "key", mtime=created))
        if entry.get("nextkeyfile"):  # a rotation under way: the key also accepted
            key, created = _key_file(
                keystore,
                entry.get("key", link),
                entry.get("next_key_fingerprint"),
                where,
                passphrase,
            )
            out.append(DesiredFile(entry["nextkeyfile"], key, 0o600, link, "nextkey",
                                   mtime=created))  # fmt: skip
    return out


#: Files apply hands to the daemon's account (``run_as``), which re-reads them on SIGHUP.
_USER_OWNED = ("key", "nextkey", "peerkey", "peernextkey")


def plan_host(
    host: str,
    manifest: Mapping[str, Any],
    desired: Iterable[DesiredFile],
    remote: RemoteState,
    *,
    runtime_stamp: str,
    use_systemd: bool,
) -> HostPlan:
    """Decide what to do on one host from what should be there and what is there."""
    runtime = remote.stamp != runtime_stamp
    changed: dict[str, list[str]] = {}
    files: list[DesiredFile] = []
    by_link: dict[str, list[DesiredFile]] = {}
    for item in desired:
        by_link.setdefault(item.link, []).append(item)
    run_as = manifest.get("run_as")
    owner = f"{run_as[0]}:{run_as[1]}" if run_as else ""  # whom apply hands the keys to
    for link, items in sorted(by_link.items()):
        reasons = []
        for item in items:
            have = remote.files.get(item.path)
            if have is None:
                reasons.append(f"new {item.kind}")
            elif have[0] != item.sha256:
                reasons.append(f"{item.kind} changed")
            elif have[1] != item.mode:
                reasons.append(f"{item.kind} mode {have[1]:o}")
            elif owner and item.kind in _USER_OWNED and have[2:] and have[2] not in ("", owner):
                reasons.append(f"{item.kind} owner {have[2]}")  # e.g. keys made before this rule
            else:
                continue
            files.append(item)
        if runtime:
            reasons.append("runtime")
        if reasons:
            changed[link] = reasons
    if remote.pending:
        # an interrupted deploy left uncommitted changes: restart and confirm every link (a
        # failure rolls back to the backups that deploy kept), so it is never taken as current
        for link in by_link:
            changed.setdefault(link, []).append("interrupted deploy not committed")
    start = sorted(
        link for link in by_link if link not in changed and not remote.running.get(link, False)
    )
    deployed_links = set((remote.deployed or {}).get("links", {}))
    removed = sorted(deployed_links - set(manifest["links"]))
    paths = {link: [item.path for item in items] for link, items in by_link.items()}
    reload, prune, touched = _plan_hubs(
        manifest, by_link, remote, changed, start=start, files=files
    )
    if not runtime and not remote.pending:
        _plan_key_reloads(manifest, by_link, remote, changed, reload, files=files)
    _prune_next_keys(manifest, remote, prune)
    for hub, gone in prune.items():
        paths[hub] = paths.get(hub, []) + gone
    unchanged = sorted(
        link for link in by_link if link not in changed and link not in start and link not in reload
    )
    return HostPlan(host, use_systemd, runtime, changed, start, removed, unchanged, files, paths,
                    reload, prune, touched)  # fmt: skip


_KEY_KINDS = ("config", "key", "nextkey")


def _keyless(entry: Mapping[str, Any], link: str) -> object:
    """The sha256 of a point-to-point entry's config without its ``nextkey`` line: recorded
    while a rotation is under way, else the config's own sha256 (it has no such line)."""
    files = entry.get("files")
    own = files.get(f"etc/vpnd/{link}.conf") if isinstance(files, Mapping) else None
    return entry.get("config_sans_keys", own)


def _plan_key_reloads(
    manifest: Mapping[str, Any],
    by_link: Mapping[str, list[DesiredFile]],
    remote: RemoteState,
    changed: dict[str, list[str]],
    reload: dict[str, list[str]],
    *,
    files: list[DesiredFile],
) -> None:
    """A running point-to-point link (or hub client) whose change is only in its keys -- its
    key files, and its config by a ``nextkey`` line at most -- is *reloaded* (SIGHUP; under
    systemd ``systemctl kill --signal=HUP``), not restarted: a `vpnctl rotate` step. The
    daemon keeps the session while its key is still accepted (docs/directives.md)."""
    deployed = (remote.deployed or {}).get("links", {})
    written = {item.path for item in files}
    for link, entry in sorted(manifest["links"].items()):
        old = deployed.get(link)
        if (
            link not in changed
            or entry.get("role") == "hub"
            or not isinstance(old, Mapping)
            or not remote.running.get(link, False)
        ):
            continue
        own = [item for item in by_link.get(link, []) if item.path in written]
        if (
            own
            and all(item.kind in _KEY_KINDS for item in own)
            and (_keyless(entry, link) == _keyless(old, link))
        ):
            reload[link] = [f"{why} (keys only)" for why in changed.pop(link)]


def _prune_next_keys(
    manifest: Mapping[str, Any], remote: RemoteState, prune: dict[str, list[str]]
) -> None:
    """The ``nextkey`` files of the last deploy that this one no longer installs (a rotation
    finished or went back) are removed: no key stays on a host that nothing uses."""
    deployed = (remote.deployed or {}).get("links", {})
    for link, entry in sorted(manifest["links"].items()):
        old = deployed.get(link)
        if not isinstance(old, Mapping):
            continue
        pairs = [(old, entry)]
        if entry.get("role") == "hub":
            before = old.get("clients") if isinstance(old.get("clients"), Mapping) else {}
            now = entry.get("clients", {})
            pairs = [(before[c], now[c]) for c in sorted(now) if isinstance(before.get(c), Mapping)]
        for was, is_now in pairs:
            path = was.get("nextkeyfile")
            if (
                isinstance(path, str)
                and _MANIFEST_PATH.fullmatch(path)
                and ".." not in path.split("/")
                and path.endswith(".next.key")
                and path != is_now.get("nextkeyfile")
                and path not in prune.get(link, [])
            ):
                prune.setdefault(link, []).append(path)


def _plan_hubs(
    manifest: Mapping[str, Any],
    by_link: Mapping[str, list[DesiredFile]],
    remote: RemoteState,
    changed: dict[str, list[str]],
    *,
    start: list[str],
    files: list[DesiredFile],
) -> tuple[dict[str, list[str]], dict[str, list[str]], dict[str, list[str]]]:
    """Hubs whose change is only in their peers directory are *reloaded* (SIGHUP), not
    restarted: the daemon applies the new client set and keeps every unchanged client's session.
    Peer files and keys of clients removed since the last deploy are pruned (and the hub
    reloaded, so the daemon cuts and revokes them). Returns (reload, prune, touched clients)."""
    reload: dict[str, list[str]] = {}
    prune: dict[str, list[str]] = {}
    touched: dict[str, list[str]] = {}
    deployed = (remote.deployed or {}).get("links", {})
    for link, entry in sorted(manifest["links"].items()):
        if entry.get("role") != "hub":
            continue
        clients = entry.get("clients", {})
        old_entry = deployed.get(link)
        before = old_entry.get("clients", {}) if isinstance(old_entry, dict) else {}
        gone = sorted(set(before) - set(clients))
        for name in gone:
            old = before[name] if isinstance(before[name], dict) else {}
            for path in (old.get("peerfile"), old.get("keyfile")):
                # only plain paths inside this hub's peers directory are ever deleted
                if (
                    isinstance(path, str)
                    and _MANIFEST_PATH.fullmatch(path)
                    and ".." not in path.split("/")
                    and path.startswith(entry["peers"] + "/")
                ):
                    prune.setdefault(link, []).append(path)
        written = {item.path for item in files}
        by_path = {c["peerfile"]: n for n, c in clients.items()}
        by_path |= {c["keyfile"]: n for n, c in clients.items()}
        touched[link] = sorted({by_path[p] for p in written if p in by_path})
        reasons = [f"client {name} removed" for name in gone]
        own = [item for item in by_link.get(link, []) if item.path in written]
        peers_only = all(item.kind in ("peer", "peerkey", "peernextkey") for item in own) and all(
            why.startswith(("new peer", "peer")) for why in changed.get(link, [])
        )
        if link in changed:
            if peers_only and remote.running.get(link, False):
                changed.pop(link)
                added = {
                    by_path[item.path]
                    for item in own
                    if item.kind == "peer" and remote.files.get(item.path) is None
                }
                reload[link] = [
                    f"client {name} {'added' if name in added else 'changed'}"
                    for name in touched[link]
                ] + reasons
            else:
                changed[link] += reasons
                touched[link] = sorted(clients)
        elif reasons and link not in start:
            reload[link] = reasons
        if link in start:
            touched[link] = sorted(clients)
    return reload, prune, touched


def redacted_diff(
    host: str, plan: HostPlan, current: Mapping[str, bytes | None], present: Iterable[str] = ()
) -> str:
    """A unified diff of every file the plan writes; key contents are replaced by a note.

    `current` maps remote paths to their present bytes (None or missing: absent). Keys are never
    read back from hosts: `present` names the secret files that exist there.
    """
    present = set(present)
    chunks: list[str] = []
    for item in plan.files:
        old_name = f"{host}:{item.path} (deployed)"
        new_name = f"{host}:{item.path} (new)"
        if item.secret:
            absent = item.path not in present
            chunks.append(
                f"--- {'/dev/null' if absent else old_name}\n+++ {new_name}\n"
                f"@@ key file, contents redacted @@\n"
                f"-[redacted]\n+[redacted key, mode {item.mode:04o}]\n"
            )
            continue
        old = current.get(item.path)
        old_lines = [] if old is None else old.decode(errors="replace").splitlines(keepends=True)
        new_lines = item.data.decode(errors="replace").splitlines(keepends=True)
        diff = "".join(
            difflib.unified_diff(
                old_lines,
                new_lines,
                "/dev/null" if old is None else old_name,
                new_name,
            )
        )
        chunks.append(diff or f"# {host}:{item.path}: mode change only\n")
    return "".join(chunks)


def parse_probe(text: str, paths: list[str]) -> RemoteState:
    """The probe's output as a RemoteState (unknown lines are ignored)."""
    stamp: str | None = None
    systemd = False
    python: str | None = None
    files: dict[str, tuple[str, int, str] | None] = dict.fromkeys(paths)
    running: dict[str, bool] = {}
    deployed: dict[str, Any] | None = None
    pending = False
    uid: int | None = None
    target_text: str | None = None
    venvs: frozenset[str] = frozenset()
    python_exe: str | None = None
    for line in text.splitlines():
        word, _, rest = line.partition(" ")
        if word == "stamp":
            stamp = None if rest.strip() in {"", "-"} else rest.strip()
        elif word == "systemd":
            systemd = rest.strip() == "yes"
        elif word == "python":
            python = None if rest.strip() == "-" else rest.strip()
        elif word == "pending":
            pending = rest.strip() == "yes"
        elif word == "target":
            target_text = rest.strip()
        elif word == "pyexe" and re.fullmatch(r"/[A-Za-z0-9_./+-]{1,255}", rest.strip()):
            python_exe = rest.strip()
        elif word == "venvs":
            venvs = frozenset(w for w in rest.split() if re.fullmatch(r"[0-9a-f]{1,64}", w))
        elif word == "uid":
            with contextlib.suppress(ValueError):
                uid = int(rest.strip())
        elif word == "file":
            parts = rest.split()
            if len(parts) not in (3, 4) or not parts[0].isdigit() or int(parts[0]) >= len(paths):
                continue  # not ours (a login banner, a shell warning): ignore like other noise
            idx, digest, mode = parts[:3]
            if digest != "-":
                with contextlib.suppress(ValueError):
                    owner = parts[3] if len(parts) == 4 else ""
                    files[paths[int(idx)]] = (digest, int(mode, 8), owner)
        elif word == "running":
            parts = rest.split()
            if len(parts) == 2:
                running[parts[0]] = parts[1] == "yes"
        elif word == "deployed" and rest.strip() not in {"", "-"}:
            with contextlib.suppress(ValueError):
                deployed = json.loads(base64.b64decode(rest.strip()))
            if not isinstance(deployed, dict) or not isinstance(deployed.get("links"), dict):
                raise DeployError(f"malformed probe answer: {STATE_DIR}/manifest.json on the "
                                  "host is not a vpnctl manifest")  # fmt: skip
    target = parse_target(target_text) if target_text is not None else None
    return RemoteState(stamp, systemd, python, files, running, deployed, pending, uid, target,
                       target_text, venvs, python_exe)  # fmt: skip


def check_remote(name: str, user: str, remote: RemoteState) -> None:
    """Refuse a host deploy cannot work on, naming it: a non-root ssh user, no python3, a
    python3 too old or whose target cannot be read."""
    if remote.uid != 0:
        found = "unknown" if remote.uid is None else str(remote.uid)
        raise DeployError(
            f"{name}: ssh user {user!r} is not root (uid {found}); deploy installs files and "
            "manages daemons on the host: give it passwordless sudo and `become: sudo` in the "
            "inventory, or set ssh.user: root"
        )
    if remote.python is None:
        raise DeployError(f"{name}: python3 not found on the host (the runtime needs it)")
    if remote.target_text is not None and remote.target is None:
        raise DeployError(f"{name}: cannot tell the host's Python target: python3 -c printed "
                          f"{remote.target_text!r}")  # fmt: skip
    if remote.target is not None and remote.target.python < MIN_PYTHON:
        have, need, key = remote.target.python, MIN_PYTHON, remote.target.key
        raise DeployError(f"{name}: python3 on the host is {have[0]}.{have[1]} (target {key}); "
                          f"the runtime needs {need[0]}.{need[1]}+")  # fmt: skip


def _describe(plan: HostPlan) -> str:
    if plan.noop:
        return f"up to date ({len(plan.unchanged)} link(s) running, nothing to do)"
    parts = []
    if plan.runtime:
        parts.append("runtime: install")
    for link, why in sorted(plan.changed.items()):
        parts.append(f"{link}: {', '.join(why)}")
    parts += [f"{link}: not running, start" for link in plan.start]
    parts += [f"{link}: {', '.join(why)}, reload (no restart)" for link, why in
              sorted(plan.reload.items())]  # fmt: skip
    parts += [f"{link}: removed from inventory, stop" for link in plan.removed]
    if plan.unchanged:
        parts.append(f"unchanged: {', '.join(plan.unchanged)}")
    return "; ".join(parts)


def skip_links_of_failed_ends(
    name: str,
    outcome: HostOutcome,
    manifest: Mapping[str, Any],
    failed: Mapping[str, str],
) -> list[str]:
    """Take out of `name`'s plan every point-to-point link (or hub-client end) whose other end
    is a host of this deploy that failed before apply (`failed`: host -> error): applying one
    end alone would restart it against a peer in an unknown state, and confirming it would
    only wait out ``--wait``. Its files are not written, its daemon not touched, and
    ``outcome.skipped`` says why. A hub's own end stays in the plan (its other clients need
    it); confirm skips the pairs of its failed clients. Returns the links taken out."""
    plan = outcome.plan
    if plan is None:
        return []
    out = []
    for link in sorted(set(plan.changed) | set(plan.start) | set(plan.reload)):
        entry = manifest["links"][link]
        other = entry.get("peer")
        if entry.get("role") == "hub" or other == name or other not in failed:
            continue
        _take_out(plan, link)
        why = str(failed[other]).removeprefix(f"{other}: ")
        outcome.skipped[link] = f"not applied: its other end {other} failed before apply ({why})"
        out.append(link)
    return out


def _take_out(plan: HostPlan, link: str) -> None:
    """Leave `link` (not a hub) as the host has it: no file written, no daemon touched."""
    plan.changed.pop(link, None)
    plan.reload.pop(link, None)
    plan.prune.pop(link, None)
    if link in plan.start:
        plan.start.remove(link)
    plan.files = [item for item in plan.files if item.link != link]


def hold_links(
    outcome: HostOutcome, manifest: Mapping[str, Any], hold: Mapping[str, str]
) -> list[str]:
    """Take the ends of the keystore keys in `hold` (key -> why) out of a host's plan, as
    :func:`skip_links_of_failed_ends` does (``outcome.skipped`` says why; the commit keeps
    their previous manifest entry): `vpnctl rotate` holds a key whose step failed earlier in
    the run at the phase it reached, while other keys on the same hosts go on. A hub's own end
    stays in the plan (its peers directory is one unit: the held client's peer file goes with
    it, which the rotation's phases allow); only the pair is not confirmed. Returns the links
    taken out."""
    plan = outcome.plan
    if plan is None or not hold:
        return []
    out = []
    for link in sorted(set(plan.changed) | set(plan.start) | set(plan.reload)):
        entry = manifest["links"][link]
        if entry.get("role") == "hub":
            clients = entry.get("clients", {})
            if link in plan.touched_clients:
                plan.touched_clients[link] = [
                    c for c in plan.touched_clients[link]
                    if c not in clients or clients[c].get("key") not in hold
                ]  # fmt: skip
            continue
        key = str(entry.get("key") or link)
        if key in hold:
            _take_out(plan, link)
            outcome.skipped[link] = f"not applied: {hold[key]}"
            out.append(link)
    return out
