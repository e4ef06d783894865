"""SIGHUP: re-read the config and keys, and change no more than what changed.

* nothing changed: nothing happens;
* a hub whose only change is its client set: unchanged clients keep their sessions, removed or
  changed ones are cut at once (their old key opens nothing from then on), new ones may connect;
* only keys changed (a rotation step, `keyfile`/`nextkey`): the running session stays up while its
  key is still accepted, and a client whose primary key changed opens a session with the new key
  beside the running one, which then replaces it (make before break);
* anything else: the link is restarted with the new config.

A config or key that does not load is logged and the running link kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from vpnd_runtime.carriers import RandomDev
from vpnd_runtime.config import Config, ConfigError, load_config
from vpnd_runtime.keyfile import KeyFileError
from vpnd_runtime.peers import Peer, PeerTable
from vpnd_runtime.session import load_table
from vpnd_runtime.status import StatusWriter

if TYPE_CHECKING:
    from vpnd_runtime.daemon import Daemon

log = logging.getLogger("vpnd")


def reload(d: Daemon) -> None:
    """SIGHUP: re-read the config and keys; restart the link only if something changed
    (a hub whose only change is its peer set keeps its unchanged clients' sessions)."""
    try:
        new = load_config(d.config.source)
        table = load_table(new)
    except (ConfigError, KeyFileError, OSError) as exc:
        log.error("SIGHUP: configuration not reloaded, keeping the running one:\n%s", exc)
        return
    old_ids = [p.identity() for p in d.table]
    new_ids = [p.identity() for p in table]
    if new == d.config and old_ids == new_ids:
        log.info("SIGHUP: configuration unchanged")
        return
    same_hub = (
        d.hub
        and new.is_hub
        and dataclasses.replace(new, peers=()) == dataclasses.replace(d.config, peers=())
    )
    if same_hub:
        reload_peers(d, new, table)
        return
    if not d.hub and not new.is_hub and _only_keys_differ(d.config, new):
        reload_keys(d, new, table.peers[0])
        return
    log.info("SIGHUP: configuration changed; restarting the link")
    d.stop_link("configuration reloaded")
    if new.randomdev != d.config.randomdev:
        try:
            rng = RandomDev(new.randomdev)
        except OSError as exc:
            log.error(
                "SIGHUP: randomdev %s: %s; keeping %s",
                new.randomdev,
                exc,
                d.config.randomdev,
            )
        else:
            d.rng.close()
            d.rng = rng
    d.config = new
    d.hub = new.is_hub
    d.table = table
    d.link.config = new
    d.status.hub = d.hub
    d.status.key_fingerprint = d.top_fingerprint()
    d.status.local = str(new.local)
    d.status.remote = str(new.remote) if new.remote is not None else ""
    d.status.local6 = str(new.local6) if new.local6 is not None else None
    d.status.remote6 = str(new.remote6) if new.remote6 is not None else None
    d.status.interface = new.interface
    d.dialer.reset()
    if new.statusfile != d.writer.path:
        d.writer.remove()
        d.writer = StatusWriter(new.statusfile)
    if new.mode == "server" and not new.is_serial:
        d.acceptor.relisten(time.monotonic())
    else:
        d.status.set_state("connecting")


def reload_peers(d: Daemon, new: Config, table: PeerTable) -> None:
    """Apply a hub's new peer set: unchanged clients keep their Peer (session, counters);
    removed or changed ones are cut at once, so their old key opens nothing from now on."""
    current = d.table.by_name
    kept, added, gone = [], [], []
    rekeyed = 0
    for fresh in table:
        old = current.get(fresh.name)
        if old is not None and old.identity() == fresh.identity():
            kept.append(old)
        elif old is not None and _same_but_keys(old, fresh) and _still_accepted(old, fresh):
            _take_keys(old, fresh)  # a rotation step: the session stays up
            kept.append(old)
            rekeyed += 1
        else:
            added.append(fresh)
    keep_ids = {id(p) for p in kept}
    gone = [p for p in d.table if id(p) not in keep_ids]
    d.config = new
    d.link.config = new
    d.table = PeerTable(kept + added, hub=True)  # the ring sees it from now on
    for _until, drained in list(d.draining):  # a revoked key opens nothing, at once
        if drained.peer in gone:
            d.close_session(drained)
    for peer in gone:
        why = "changed" if peer.name in table.by_name else "removed"
        reason = f"client {why} by a reload"
        if peer.session is not None:
            session = peer.session
            with contextlib.suppress(Exception):
                session.conn.close(reason)
                d.flush_out(session)
            d.end_session(session, reason)
    for s in list(d.pending):  # proven but unconfirmed handshakes of a revoked key
        if s.conn.peer is not None and d.table.by_name.get(s.conn.peer.name) is not (s.conn.peer):
            d.close_session(s)
    d.status.key_fingerprint = d.top_fingerprint()
    d.status_dirty = True
    log.info(
        "SIGHUP: clients reloaded: %d kept (%d with new keys), %d added or changed, "
        "%d removed or changed",
        len(kept),
        rekeyed,
        len(added),
        len(gone),
    )


def reload_keys(d: Daemon, new: Config, fresh: Peer) -> None:
    """A point-to-point link whose config changed only in `keyfile`/`nextkey` (a rotation
    step): the running session stays up while its key is still accepted; a client whose
    primary key changed opens a new session with it beside the running one, which then
    replaces it (make before break: the TUN, routes and the ping running stay)."""
    peer = d.peer
    primary_changed = fresh.key != peer.key
    keep = _still_accepted(peer, fresh)
    _take_keys(peer, fresh)
    d.table = PeerTable([peer], hub=False)  # index the new keys (the ring reads it)
    d.config = new
    d.link.config = new
    d.status.key_fingerprint = peer.fingerprint
    d.status.next_key_fingerprint = peer.next_fingerprint
    d.status_dirty = True
    session = peer.session
    if session is not None and not keep:
        log.info("SIGHUP: the running session's key is no longer accepted; reconnecting")
        d.end_session(session, "key rotated out")
        return
    log.info(
        "SIGHUP: keys reloaded (key %s%s); the link stays up",
        peer.fingerprint,
        f", also accepting {peer.next_fingerprint}" if peer.next_key is not None else "",
    )
    if primary_changed and session is not None and d.dials and not new.is_serial:
        d.dialer.redial = True  # the new key proves itself on a second connection first


_KEY_FIELDS = ("key", "fingerprint", "next_key", "next_fingerprint")


def _only_keys_differ(old: Config, new: Config) -> bool:
    """True when two configs differ in `keyfile`/`nextkey` at most."""
    return dataclasses.replace(new, keyfile=old.keyfile, nextkey=old.nextkey) == old


def _same_but_keys(old: Peer, new: Peer) -> bool:
    """True when two peers differ in their keys at most (`key`, `next_key`: a rotation step)."""
    return dataclasses.replace(new, key=old.key, next_key=old.next_key).identity() == (
        old.identity()
    )


def _still_accepted(old: Peer, new: Peer) -> bool:
    """True when `old`'s running session (if any) was opened with a key `new` still accepts."""
    if old.session is None:
        return True
    used = old.fingerprint_of(old.session.conn.key_id)
    return used in (new.fingerprint, new.next_fingerprint)


def _take_keys(peer: Peer, fresh: Peer) -> None:
    """Give `peer` the keys of `fresh` (the rest of it, its session and counters, stay)."""
    for name in _KEY_FIELDS:
        setattr(peer, name, getattr(fresh, name))
