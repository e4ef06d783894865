"""``vpnctl status``: every link seen from both of its ends, gathered over ssh in parallel.

Theory of operation
-------------------
The hosts to ask are the named ones (default: all) plus the far end of each of their links, so
every link is always seen from both ends. Each host gets *one* ssh command, a short shell script
(:func:`vpnctl.deploy.status_script`) that does for all its links what ``vpnd status --json``
does for one -- print the record the daemon publishes atomically, and whether its process is
alive (else the link is ``not running``) -- without starting Python once per link. It also
prints each key file's mtime (deploy sets it to the key's creation time, so it gives the key's
age) and the host's clock (uptimes use the host's own ``now``, so clock skew does not distort
them).

Hosts are asked in parallel (a pool of ``jobs``) under *one* overall deadline, ``timeout``
seconds from the start: each ssh call is bounded by the time left, and a host whose turn comes
after the deadline is not asked and shows as ``unreachable``. So ``vpnctl status`` answers within
about ``timeout`` seconds whatever the number of hosts and silent hosts.

A record is trusted only when the pidfile names the process that wrote it and it was rewritten
within the last few seconds (the daemon rewrites it every second): otherwise the end shows as
``not running`` or ``stale`` (see :func:`vpnctl.deploy.parse_status_output`).

KEY is the key each end's session uses (``session_key_fingerprint``; the configured key when
the daemon does not say), NEXT KEY a second key the end also accepts while ``vpnctl rotate``
runs (the column is left out when no end has one). KEY AGE is operator-side knowledge: the
keystore's creation time of the end's primary key, which deploy stamps on the key file as its
mtime -- the daemon itself does not know when a key was made.

A link is **up** only when both ends report ``up`` with the same (session) key. Otherwise the
table says why, from the ends' states and reasons: ``no answer from peer``, ``authentication
failed``, ``not running``, ``unreachable``, ``not deployed``, or a fingerprint mismatch.
"""

from __future__ import annotations

import math
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vpnctl.deploy import (
    BAD_ANSWER,
    _peer_record,
    finite_number,
    load_manifest,
    parse_status_output,
    status_script,
)
from vpnctl.hostdata import clean_text
from vpnctl.inventory import Inventory, UserError
from vpnctl.keystore import format_age
from vpnctl.ssh import SshError, SshHost
from vpnd_runtime.status import format_bytes, prometheus_text

__all__ = [
    "COLUMNS",
    "EndStatus",
    "FleetStatus",
    "LinkStatus",
    "MalformedAnswer",
    "collect",
    "end_row",
    "format_table",
    "parse_host_output",
    "table_rows",
]

DEFAULT_TIMEOUT = 10.0
DEFAULT_JOBS = 16
MIN_CALL = 0.2  # seconds: below this an ssh call cannot succeed; the host is not asked
ASKING = "asking"  # the state of an end whose host has not answered yet (live view only)
HOST_FAILURES = ("unreachable", BAD_ANSWER, ASKING)  # end states said once, on the host's line


@dataclass
class EndStatus:
    """One end of one link as its host reports it."""

    host: str
    link: str
    role: str
    state: str  # up, connecting, listening, handshake, down, not running, stale, not deployed,
    # unreachable
    reason: str | None = None
    peer: str | None = None
    uptime: float | None = None
    last_rtt: float | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    key_fingerprint: str | None = None
    key_age: float | None = None
    pid: int | None = None
    #: The key this end's running session was opened with (None when not up, or a daemon that
    #: predates it), and a second key it also accepts (``nextkey``: a rotation under way).
    session_key_fingerprint: str | None = None
    next_key_fingerprint: str | None = None
    record: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # cleaned
    #: This end's tunnel addresses, both families ("198.19.0.1 fd12::1"), from its record.
    tunnel: str | None = None


@dataclass
class LinkStatus:
    """A link and both its ends; ``up`` only when both are up with the same key."""

    link: str
    up: bool
    why: str
    ends: list[EndStatus] = field(default_factory=list)


@dataclass
class FleetStatus:
    """Everything ``vpnctl status`` shows."""

    links: list[LinkStatus]
    unreachable: dict[str, str]  # host -> why
    elapsed: float = 0.0
    bad_answers: dict[str, str] = field(default_factory=dict)  # host -> what was malformed
    hubs: dict[str, EndStatus] = field(default_factory=dict)  # hub -> the hub daemon itself

    @property
    def all_up(self) -> bool:
        """True when every link is up at both ends."""
        return all(link.up for link in self.links)

    def to_json(self) -> dict[str, Any]:
        """The JSON document of ``vpnctl status --json`` (stable keys, for scripts)."""
        return {
            "version": 1,
            "all_up": self.all_up,
            "unreachable": self.unreachable,
            "bad_answers": self.bad_answers,
            "links": [
                {**asdict(link), "ends": [_end_json(end) for end in link.ends]}
                for link in self.links
            ],
            **(
                {"hubs": {name: _end_json(end) for name, end in self.hubs.items()}}
                if self.hubs
                else {}
            ),
        }

    def prometheus(self) -> str:
        """Every end's record as Prometheus text (labels host, link, role; the same metric
        families as ``vpnd status --prometheus``), plus per host and per link verdicts."""
        ends = [
            ({"host": e.host, "link": e.link, "role": e.role}, e.record or {"state": e.state})
            for link in self.links
            for e in link.ends
        ]
        text = prometheus_text(ends)
        hosts = sorted({e.host for link in self.links for e in link.ends})
        failed = set(self.unreachable) | set(self.bad_answers)
        lines = [
            "# HELP vpnctl_host_answered 1 when the host answered vpnctl status with a valid "
            "record, else 0.",
            "# TYPE vpnctl_host_answered gauge",
            *(f'vpnctl_host_answered{{host="{h}"}} {0 if h in failed else 1}' for h in hosts),
            "# HELP vpnctl_link_up 1 when both ends of the link are up with the same key.",
            "# TYPE vpnctl_link_up gauge",
            *(f'vpnctl_link_up{{link="{link.link}"}} {int(link.up)}' for link in self.links),
            "# HELP vpnctl_status_duration_seconds How long asking the fleet took.",
            "# TYPE vpnctl_status_duration_seconds gauge",
            f"vpnctl_status_duration_seconds {round(self.elapsed, 3)}",
        ]
        return text + "\n".join(lines) + "\n"


def _end_json(end: EndStatus) -> dict[str, Any]:
    doc = asdict(end)
    del doc["record"]
    return doc


class MalformedAnswer(UserError):
    """A host answered, but not with what the status script prints (cut short, wrong types,
    not JSON): shown as that host's error line, never a crash of the fleet view."""


def _units(host: str, manifest: Mapping[str, Any]) -> list[tuple[str, str, str | None]]:
    """(status unit, link on this host, client name) for every link of a host's manifest: a
    link is its own unit; a hub is one unit ``hub/client`` per client (read from the hub
    record's ``peers[]``) plus the hub itself; a hub's client is the unit of its pair."""
    out: list[tuple[str, str, str | None]] = []
    for link, entry in sorted(manifest["links"].items()):
        if entry.get("role") == "hub":
            out.append((link, link, None))
            out += [(f"{link}/{client}", link, client) for client in sorted(entry["clients"])]
        elif entry.get("hub"):
            out.append((f"{entry['hub']}/{host}", link, None))
        else:
            out.append((link, link, None))
    return out


def _other_hosts(host: str, manifest: Mapping[str, Any]) -> set[str]:
    """The hosts at the far end of this host's links (a hub's: all its clients)."""
    out = set()
    for entry in manifest["links"].values():
        if entry.get("role") == "hub":
            out |= {str(c["host"]) for c in entry["clients"].values()}
        elif entry.get("peer"):
            out.add(str(entry["peer"]))
    out.discard(host)
    return out


def parse_host_output(host: str, manifest: Mapping[str, Any], text: str) -> list[EndStatus]:
    """Turn one host's :func:`vpnctl.deploy.status_script` output into an EndStatus per link
    (per hub: one for the hub daemon and one per client, from its record's ``peers[]``).

    Raises MalformedAnswer when the output lacks a link's block (cut short) or holds a record
    of the wrong shape; every string taken from it is already cleaned of control characters.
    """
    found = parse_status_output(text)
    missing = [link for link in sorted(manifest["links"]) if link not in found]
    if missing:
        raise MalformedAnswer(f"answer cut short: nothing about link(s) {', '.join(missing)}")
    for link, read in sorted(found.items()):
        if read.record is not None and read.record.get("state") == BAD_ANSWER:
            raise MalformedAnswer(f"link {link}: {read.record.get('reason')}")
    ends = []
    for unit, link, client in _units(host, manifest):
        entry = manifest["links"][link]
        end = EndStatus(host=host, link=unit, role=entry.get("role", "?"), state="not deployed")
        read = found.get(link)
        record = read.record if read is not None else None
        if client is not None:  # a hub client: the hub's entry for it in the record's peers[]
            record = _peer_record(record, client)
            if record is not None and record.get("session_age") is not None and read is not None:
                record["since"] = read.now - float(record["session_age"])
        if record is not None:
            # The record is the host's word: a field of the wrong type, or a number that is not
            # finite, is shown as unknown rather than crash the table or the JSON.
            end.state = str(record.get("state", "unknown"))
            end.reason = _text(record.get("reason"))
            end.peer = _text(record.get("peer"))
            end.last_rtt = finite_number(record.get("last_rtt"))
            end.bytes_in = _count(record.get("bytes_in"))
            end.bytes_out = _count(record.get("bytes_out"))
            end.key_fingerprint = _text(record.get("key_fingerprint"))
            if end.state == "up":
                end.session_key_fingerprint = _text(record.get("session_key_fingerprint"))
            end.next_key_fingerprint = _text(record.get("next_key_fingerprint"))
            end.pid = _count(record.get("pid"))
            end.record = record
            own = [record.get("local"), record.get("local6")]
            end.tunnel = " ".join(str(a) for a in own if isinstance(a, str) and a) or None
            since = finite_number(record.get("since"))
            if end.state == "up" and since is not None and read is not None:
                end.uptime = _age(read.now - since)
        if read is not None and read.key_mtime is not None:
            end.key_age = _age(read.now - read.key_mtime)
        ends.append(end)
    return ends


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _count(value: object) -> int | None:
    """A non-negative integer of a record (bytes, pid); None when it is anything else."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _age(seconds: float) -> float | None:
    """A duration between two finite host times, clamped at 0; None when it overflows."""
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _judge(link: str, ends: list[EndStatus]) -> LinkStatus:
    """Is the link up, and if not, why (the most telling reason of either end)."""
    ends = sorted(ends, key=lambda e: (e.role != "server", e.host))
    if all(e.state == "up" for e in ends) and len(ends) == 2:
        # the key each session uses: during a rotation the two ends' primary keys differ
        fps = {e.session_key_fingerprint or e.key_fingerprint for e in ends}
        if len(fps) == 1:
            return LinkStatus(link, True, "up", ends)
        return LinkStatus(link, False, "key fingerprints differ between the ends", ends)
    reasons = []
    for end in ends:
        if end.state == "up":
            continue
        if end.state in HOST_FAILURES:  # its reason is on the host's own line, said once
            reasons.append(f"{end.host}: {end.state}")
            continue
        why = end.reason or end.state
        reasons.append(
            f"{end.host}: {why}" if why == end.state else f"{end.host}: {end.state}, {why}"
        )
    return LinkStatus(link, False, "; ".join(reasons) or "incomplete", ends)


def collect(
    inventory: Inventory,
    build: Path,
    hosts: Iterable[str] = (),
    *,
    timeout: float = DEFAULT_TIMEOUT,
    jobs: int = DEFAULT_JOBS,
    connect_timeout: float = 5.0,
    on_answer: Callable[[FleetStatus], None] | None = None,
) -> FleetStatus:
    """Ask every relevant host in parallel; hosts that do not answer within `timeout` are
    reported unreachable, hosts whose answer is malformed as a bad answer. ``on_answer`` gets
    the status so far each time a host is done (the live view on a terminal)."""
    started = time.monotonic()
    known = {h.name: h for h in inventory.hosts}
    wanted = list(hosts) or list(known)
    unknown = [h for h in wanted if h not in known]
    if unknown:
        raise UserError(f"{inventory.file}: no host named {', '.join(unknown)}; "
                        f"the hosts are: {', '.join(known)}")  # fmt: skip
    manifests = {name: load_manifest(build, name) for name in known}
    units = sorted({unit for name in wanted for unit, _, _ in _units(name, manifests[name])})
    ask = sorted(set(wanted) | {h for n in wanted for h in _other_hosts(n, manifests[n])})
    hub_names = {ln for n in known for ln, e in manifests[n]["links"].items()
                 if e.get("role") == "hub"}  # fmt: skip
    links = [unit for unit in units if unit not in hub_names]
    deadline = started + timeout

    def ask_host(name: str) -> tuple[str, list[EndStatus] | tuple[str, str]]:
        left = deadline - time.monotonic()
        if left < MIN_CALL:
            why = f"not asked: the {timeout:.1f}s bound ran out first (raise --jobs)"
            return name, ("unreachable", why)
        ssh = SshHost(name, known[name].ssh, connect_timeout=min(connect_timeout, left))
        try:
            result = ssh.run(status_script(manifests[name], manifests[name]["links"]),
                             timeout=left)  # fmt: skip
            return name, parse_host_output(name, manifests[name], result.text)
        except MalformedAnswer as exc:
            return name, (BAD_ANSWER, str(exc))
        except SshError as exc:
            why = str(exc).removeprefix(f"{name}: ").removeprefix("unreachable: ")
            return name, ("unreachable", why)

    done: dict[str, list[EndStatus] | tuple[str, str]] = {}
    lock = threading.Lock()

    def answered(name: str) -> None:
        _, answer = ask_host(name)
        with lock:
            done[name] = answer
            if on_answer is not None:
                pending = [n for n in ask if n not in done]
                elapsed = time.monotonic() - started
                on_answer(_assemble(links, manifests, done, pending, elapsed, hub_names=hub_names))

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(answered, ask))
    elapsed = time.monotonic() - started
    return _assemble(links, manifests, done, [], elapsed, hub_names=hub_names)


def _assemble(
    links: list[str],
    manifests: Mapping[str, Mapping[str, Any]],
    answers: Mapping[str, list[EndStatus] | tuple[str, str]],
    pending: list[str],
    elapsed: float,
    *,
    hub_names: set[str],
) -> FleetStatus:
    """The FleetStatus of the answers so far; each end of a host still being asked is shown
    in state ``asking`` (the live view on a terminal redraws as hosts answer)."""
    ends: dict[str, list[EndStatus]] = {link: [] for link in links}
    hubs: dict[str, EndStatus] = {}
    unreachable: dict[str, str] = {}
    bad_answers: dict[str, str] = {}
    for name in [*sorted(answers), *pending]:
        answer = answers.get(name, (ASKING, ""))
        if isinstance(answer, tuple):
            state, why = answer[0], clean_text(answer[1])
            if state == "unreachable":
                unreachable[name] = why
            elif state == BAD_ANSWER:
                bad_answers[name] = why
            for unit, link, _ in _units(name, manifests[name]):
                role = manifests[name]["links"][link].get("role", "?")
                end = EndStatus(name, unit, role, state, why or None)
                if unit in hub_names:
                    hubs[unit] = end
                elif unit in ends:
                    ends[unit].append(end)
            continue
        for end in answer:
            if end.link in hub_names:
                hubs[end.link] = end
            elif end.link in ends:
                ends[end.link].append(end)
    result = [_judge(link, ends[link]) for link in links]
    return FleetStatus(result, unreachable, elapsed, bad_answers, hubs)


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else format_bytes(n, compact=True)


def _fmt_rtt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:.1f}ms" if ms < 100 else f"{ms:.0f}ms"


@dataclass(frozen=True)
class Column:
    """A table column; when the table is too wide, columns with the highest ``drop`` number go
    first (0: never dropped)."""

    name: str
    drop: int


COLUMNS = (
    Column("LINK", 0),
    Column("VERDICT", 0),
    Column("HOST", 0),
    Column("ROLE", 5),
    Column("STATE", 0),
    Column("PEER", 7),
    Column("UPTIME", 1),
    Column("RTT", 2),
    Column("IN", 3),
    Column("OUT", 3),
    Column("KEY", 4),
    Column("KEY AGE", 6),
    Column("TUNNEL", 8),
    Column("NEXT KEY", 9),
)
_GAP = "  "
_GREEN, _RED, _YELLOW, _RESET = "\x1b[32m", "\x1b[31m", "\x1b[33m", "\x1b[0m"


def end_row(end: EndStatus) -> dict[str, str]:
    """The cells of one link end, by column name (LINK and VERDICT are the link's, not set
    here). Every string from the host is cleaned; the state is the bare state -- its reason is
    said once, below the table."""
    return {
        "HOST": clean_text(end.host),
        "ROLE": clean_text(end.role),
        "STATE": clean_text(end.state),
        "PEER": clean_text(end.peer) if end.peer else "-",
        "UPTIME": format_age(end.uptime) if end.uptime is not None else "-",
        "RTT": _fmt_rtt(end.last_rtt),
        "IN": _fmt_bytes(end.bytes_in),
        "OUT": _fmt_bytes(end.bytes_out),
        "KEY": clean_text(_used_key(end)) if _used_key(end) else "-",
        "NEXT KEY": clean_text(end.next_key_fingerprint) if end.next_key_fingerprint else "-",
        "KEY AGE": format_age(end.key_age) if end.key_age is not None else "-",
        "TUNNEL": clean_text(end.tunnel) if end.tunnel else "-",
    }


def _used_key(end: EndStatus) -> str | None:
    """The key an end uses: its session's when up (it differs from its primary key while a
    rotation switches), else its primary key."""
    return end.session_key_fingerprint or end.key_fingerprint


def _hub_row(status: FleetStatus, hub: str) -> dict[str, str]:
    """The first row of a hub's block: the hub daemon itself and how many clients are up."""
    pairs = [ln for ln in status.links if ln.link.startswith(f"{hub}/")]
    end = status.hubs.get(hub)
    row = dict.fromkeys((c.name for c in COLUMNS), "-")
    row.update(
        LINK=clean_text(hub),
        VERDICT=f"{sum(1 for ln in pairs if ln.up)}/{len(pairs)} UP",
        HOST=clean_text(end.host) if end else "-",
        ROLE="hub",
        STATE=clean_text(end.state) if end else "not deployed",
    )
    return row


def _hub_client_row(link: LinkStatus, client: str) -> dict[str, str]:
    """One hub client as one row: the client's own state (and the hub's view when it differs),
    the session as the hub sees it (endpoint, age, RTT, bytes), the client's key."""
    hub_end = next((e for e in link.ends if e.role == "hub"), None)
    own = next((e for e in link.ends if e.role != "hub"), None)
    view = hub_end or own
    row = end_row(view) if view is not None else {c.name: "-" for c in COLUMNS}
    state = clean_text(own.state) if own is not None else "not deployed"
    if hub_end is not None and hub_end.state != (own.state if own else None):
        state += f" (hub: {clean_text(hub_end.state)})"
    row.update(
        LINK=f"  {clean_text(client)}",
        VERDICT="UP" if link.up else "DOWN",
        HOST=clean_text(own.host) if own is not None else clean_text(client),
        ROLE="client",
        STATE=state,
    )
    if own is not None:
        own_cells = end_row(own)
        row["KEY"], row["KEY AGE"] = own_cells["KEY"], own_cells["KEY AGE"]
        row["NEXT KEY"] = own_cells["NEXT KEY"]
    return row


def table_rows(status: FleetStatus) -> list[dict[str, str]]:
    """A row per link end; the link's name and verdict on its first row. A hub is one block:
    its own row, then one row per client."""
    rows = []
    shown_hubs: set[str] = set()
    for link in status.links:
        hub, _, client = link.link.partition("/")
        if client:
            if hub not in shown_hubs:
                shown_hubs.add(hub)
                rows.append(_hub_row(status, hub))
            rows.append(_hub_client_row(link, client))
            continue
        for i, end in enumerate(link.ends):
            row = end_row(end)
            row["LINK"] = clean_text(link.link) if i == 0 else ""
            row["VERDICT"] = ("UP" if link.up else "DOWN") if i == 0 else ""
            rows.append(row)
    return rows


def _paint(column: str, cell: str, padded: str) -> str:
    colour = None
    if column == "VERDICT" and cell:
        colour = _GREEN if cell == "UP" else _RED
    elif column == "STATE":
        failed = cell in HOST_FAILURES and cell != ASKING
        colour = _GREEN if cell == "up" else _RED if failed else _YELLOW
    return f"{colour}{cell}{_RESET}{padded[len(cell) :]}" if colour else padded


def format_table(status: FleetStatus, *, width: int | None = None, color: bool = False) -> str:
    """The status table and, below it, each problem said once.

    ``width`` (terminal columns; None: no limit, as with ``--wide`` or into a pipe) drops the
    least telling columns (NEXT KEY, TUNNEL, PEER, KEY AGE, ROLE, KEY, IN/OUT, RTT, UPTIME, in that
    order)
    until
    the table fits, and wraps the lines below it. ``color`` paints UP/DOWN and the states.
    """
    rows = table_rows(status)
    columns = list(COLUMNS)
    if all(row["TUNNEL"] == "-" for row in rows):  # records of daemons that predate it
        columns = [c for c in columns if c.name != "TUNNEL"]
    if all(row["NEXT KEY"] == "-" for row in rows):  # shown only while a rotation is under way
        columns = [c for c in columns if c.name != "NEXT KEY"]

    def table_width(cols: list[Column]) -> int:
        widths = [max(len(c.name), *(len(r[c.name]) for r in rows)) for c in cols]
        return sum(widths) + len(_GAP) * (len(cols) - 1)

    dropped: list[str] = []
    while width is not None and table_width(columns) > width:
        worst = max(c.drop for c in columns)
        if worst == 0:
            break
        dropped += [c.name for c in columns if c.drop == worst]
        columns = [c for c in columns if c.drop != worst]
    widths = {c.name: max(len(c.name), *(len(r[c.name]) for r in rows)) for c in columns}
    out = [_GAP.join(c.name.ljust(widths[c.name]) for c in columns).rstrip()]
    for row in rows:
        cells = []
        for c in columns:
            padded = row[c.name].ljust(widths[c.name])
            cells.append(_paint(c.name, row[c.name], padded) if color else padded)
        out.append(_GAP.join(cells).rstrip())
    notes: list[str] = []
    down = [link for link in status.links if not link.up]
    notes += [f"DOWN {clean_text(link.link)}: {clean_text(link.why)}" for link in down]
    notes += [f"UNREACHABLE {clean_text(host)}: {why}" for host, why in
              sorted(status.unreachable.items())]  # fmt: skip
    notes += [f"BAD ANSWER {clean_text(host)}: {why}" for host, why in
              sorted(status.bad_answers.items())]  # fmt: skip
    up = len(status.links) - len(down)
    notes.append(f"{up}/{len(status.links)} link(s) up ({status.elapsed:.1f}s)")
    if dropped:
        notes.append(f"(not shown to fit {width} columns: {', '.join(dropped)}; --wide shows all)")
    out.append("")
    for note in notes:
        if width is None or len(note) <= width:
            out.append(note)
        else:
            out += textwrap.wrap(note, width=max(width, 20), subsequent_indent="  ",
                                 break_on_hyphens=False)  # fmt: skip
    return "\n".join(out) + "\n"
