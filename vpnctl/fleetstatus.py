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

A link is **up** only when both ends report ``up`` with the same key fingerprint. Otherwise the
table says why, from the ends' states and reasons: ``no answer from peer``, ``authentication
failed``, ``not running``, ``unreachable``, ``not deployed``, or a fingerprint mismatch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vpnctl.deploy import finite_number, load_manifest, parse_status_output, status_script
from vpnctl.inventory import Inventory, UserError
from vpnctl.keystore import format_age
from vpnctl.ssh import SshError, SshHost
from vpnd_runtime.status import format_bytes

__all__ = ["EndStatus", "FleetStatus", "LinkStatus", "collect", "format_table", "parse_host_output"]

DEFAULT_TIMEOUT = 10.0
DEFAULT_JOBS = 16
MIN_CALL = 0.2  # seconds: below this an ssh call cannot succeed; the host is not asked


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
            "links": [asdict(link) for link in self.links],
        }


def parse_host_output(host: str, manifest: Mapping[str, Any], text: str) -> list[EndStatus]:
    """Turn one host's :func:`vpnctl.deploy.status_script` output into an EndStatus per link."""
    found = parse_status_output(text)
    ends = []
    for link, entry in sorted(manifest["links"].items()):
        end = EndStatus(host=host, link=link, role=entry.get("role", "?"), state="not deployed")
        read = found.get(link)
        record = read.record if read is not None else None
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
            end.pid = _count(record.get("pid"))
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
        fps = {e.key_fingerprint for e in ends}
        if len(fps) == 1:
            return LinkStatus(link, True, "up", ends)
        return LinkStatus(link, False, "key fingerprints differ between the ends", ends)
    reasons = []
    for end in ends:
        if end.state == "up":
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
) -> FleetStatus:
    """Ask every relevant host in parallel; hosts that do not answer within `timeout` are
    reported unreachable."""
    started = time.monotonic()
    known = {h.name: h for h in inventory.hosts}
    wanted = list(hosts) or list(known)
    unknown = [h for h in wanted if h not in known]
    if unknown:
        raise UserError(f"{inventory.file}: no host named {', '.join(unknown)}")
    manifests = {name: load_manifest(build, name) for name in known}
    links = sorted({link for name in wanted for link in manifests[name]["links"]})
    ask = sorted(
        set(wanted)
        | {manifests[n]["links"][ln]["peer"] for n in wanted for ln in manifests[n]["links"]}
    )
    ends: dict[str, list[EndStatus]] = {link: [] for link in links}
    unreachable: dict[str, str] = {}

    deadline = started + timeout

    def ask_host(name: str) -> tuple[str, list[EndStatus] | str]:
        left = deadline - time.monotonic()
        if left < MIN_CALL:
            return name, f"not asked: the {timeout:g}s bound ran out first (raise --jobs)"
        ssh = SshHost(name, known[name].ssh, connect_timeout=min(connect_timeout, left))
        try:
            result = ssh.run(status_script(manifests[name], manifests[name]["links"]),
                             timeout=left)  # fmt: skip
        except SshError as exc:
            return name, str(exc).removeprefix(f"{name}: ")
        return name, parse_host_output(name, manifests[name], result.text)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        answers = list(pool.map(ask_host, ask))
    for name, answer in answers:
        if isinstance(answer, str):
            unreachable[name] = answer
            for link, entry in manifests[name]["links"].items():
                if link in ends:
                    ends[link].append(
                        EndStatus(name, link, entry.get("role", "?"), "unreachable", answer)
                    )
            continue
        for end in answer:
            if end.link in ends:
                ends[end.link].append(end)
    result = [_judge(link, ends[link]) for link in links]
    return FleetStatus(result, unreachable, time.monotonic() - started)


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else format_bytes(n, compact=True)


def format_table(status: FleetStatus) -> str:
    """One table: a row per link end, the link's verdict on its first row."""
    header = ("LINK", "VERDICT", "HOST", "ROLE", "STATE", "PEER", "UPTIME", "RTT", "IN", "OUT",
              "KEY", "KEY AGE")  # fmt: skip
    rows: list[tuple[str, ...]] = []
    for link in status.links:
        for i, end in enumerate(link.ends):
            state = (
                end.state if not end.reason or end.state == "up" else f"{end.state}: {end.reason}"
            )
            rows.append(
                (
                    link.link if i == 0 else "",
                    ("UP" if link.up else "DOWN") if i == 0 else "",
                    end.host,
                    end.role,
                    state[:48],
                    end.peer or "-",
                    format_age(end.uptime) if end.uptime is not None else "-",
                    f"{end.last_rtt * 1000:.1f}ms" if end.last_rtt is not None else "-",
                    _fmt_bytes(end.bytes_in),
                    _fmt_bytes(end.bytes_out),
                    end.key_fingerprint or "-",
                    format_age(end.key_age) if end.key_age is not None else "-",
                )
            )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    down = [link for link in status.links if not link.up]
    out.append("")
    if down:
        out += [f"DOWN {link.link}: {link.why}" for link in down]
    for host, why in sorted(status.unreachable.items()):
        out.append(f"UNREACHABLE {host}: {why}")
    up = len(status.links) - len(down)
    out.append(f"{up}/{len(status.links)} link(s) up ({status.elapsed:.1f}s)")
    return "\n".join(out) + "\n"
