"""The daemon's status record, and `vpnd status` which reads it from another process.

The daemon owns one `StatusRecord`, updates it in place as events happen, and `StatusWriter`
publishes it as JSON (temp file + rename, so a reader never sees half a record) on every state
change and at least once a second while traffic flows. `vpnd status` needs no IPC: it reads the file
and checks that the recorded PID is alive, so a crashed daemon shows as "not running" rather than
as its last words. The format is documented in docs/architecture.md; vpnctl status parses it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any

STATUS_VERSION = 1

#: States a link can be in; "not running" is only ever produced by the reader.
STATES = ("starting", "connecting", "listening", "handshake", "up", "down", "stopped")


@dataclass
class StatusRecord:
    """Everything `vpnd status` shows. Counters are tunnel-side (IP packets and their bytes)."""

    config: str
    mode: str
    interface: str
    local: str
    remote: str
    key_fingerprint: str
    pid: int = field(default_factory=os.getpid)
    version: int = STATUS_VERSION
    state: str = "starting"
    since: float = field(default_factory=time.time)
    reason: str | None = None
    peer: str | None = None
    session_started: float | None = None
    session_age: float | None = None
    rekeys: int = 0
    epoch: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0
    carrier_bytes_in: int = 0  # bytes on the TCP connection / serial line, framing included
    carrier_bytes_out: int = 0
    last_rtt: float | None = None
    missed_keepalives: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0
    links_up: int = 0
    updated: float = 0.0
    #: The key the current session was opened with (differs from key_fingerprint while a
    #: rotation is under way: the far end may use `nextkey`), and the second accepted key.
    session_key_fingerprint: str | None = None
    next_key_fingerprint: str | None = None
    #: A hub (many clients): its clients' entries, and how many there are / are up.
    hub: bool = False
    peers: list[dict[str, Any]] = field(default_factory=list)
    peers_total: int = 0
    peers_up: int = 0
    #: A dual-stack link's IPv6 tunnel addresses (`local6`/`remote6`); absent when not set.
    local6: str | None = None
    remote6: str | None = None
    #: UDP: times the peer's address changed under an authenticated session (roaming).
    roams: int = 0

    def set_state(self, state: str, reason: str | None = None) -> None:
        """Move to `state` (recording since when) unless already there with the same reason."""
        if state != self.state or reason != self.reason:
            self.state = state
            self.reason = reason
            self.since = time.time()


_FIELD_NAMES = tuple(f.name for f in dataclass_fields(StatusRecord))


class StatusWriter:
    """Publishes a StatusRecord atomically at `path` (creating its directory)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tmp = f"{path}.tmp.{os.getpid()}"

    def write(self, record: StatusRecord) -> None:
        """Write the record now; errors are swallowed by the caller's choice, not here."""
        record.updated = time.time()
        if record.session_started is not None and record.state == "up":
            record.session_age = round(record.updated - record.session_started, 3)
        else:
            record.session_age = None
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        # Shallow: asdict() deep-copies every hub client's entry once a second, which was most of
        # an idle hub's CPU with a thousand clients (bench/hub_findings.md).
        fields = {name: getattr(record, name) for name in _FIELD_NAMES}
        if not record.hub:  # a point-to-point record keeps its first-version shape
            for name in ("hub", "peers", "peers_total", "peers_up"):
                del fields[name]
        for name in ("local6", "remote6"):
            if fields[name] is None:
                del fields[name]
        data = json.dumps(fields, sort_keys=True)
        fd = self._open_tmp()
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)
        os.replace(self._tmp, self.path)

    def _open_tmp(self) -> int:
        """Create the temp file afresh: O_EXCL|O_NOFOLLOW, so a symlink (or anything else)
        planted at its name is never written through, only unlinked (which removes the link,
        not its target) before one more exclusive try."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(self._tmp, flags, 0o644)
        except FileExistsError:
            os.unlink(self._tmp)  # a leftover of a crash, or planted: either way not ours
            return os.open(self._tmp, flags, 0o644)

    def remove(self) -> None:
        """Delete the published record (on clean shutdown)."""
        for p in (self.path, self._tmp):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


def pid_alive(pid: int) -> bool:
    """True when a process with this PID exists (ours to signal or not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_status(path: str) -> dict[str, Any]:
    """Read a published record; a missing file or dead PID yields state 'not running'."""
    try:
        with open(path, encoding="utf-8") as fh:
            record: dict[str, Any] = json.load(fh)
    except FileNotFoundError:
        return {
            "version": STATUS_VERSION,
            "state": "not running",
            "reason": "no status file",
            "statusfile": path,
        }
    except (OSError, ValueError) as exc:
        return {
            "version": STATUS_VERSION,
            "state": "not running",
            "reason": f"unreadable status file {path}: {exc}",
            "statusfile": path,
        }
    if not pid_alive(int(record.get("pid", 0))):
        record["reason"] = (
            f"daemon (pid {record.get('pid')}) is gone; last state {record.get('state')}"
        )
        record["state"] = "not running"
    record["statusfile"] = path
    return record


def format_bytes(n: int, compact: bool = False) -> str:
    """A byte count for people: `1.5 MiB`, or `1.5M` when `compact` (for tables)."""
    units = ("B", "K", "M", "G") if compact else ("B", "KiB", "MiB", "GiB")
    sep = "" if compact else " "
    value = float(n)
    for unit in units:
        if value < 1024 or unit == units[-1]:
            return f"{value:.0f}{sep}{unit}" if unit == "B" else f"{value:.1f}{sep}{unit}"
        value /= 1024
    return f"{n}{sep}B"  # pragma: no cover - the loop always returns


def _fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def format_status(record: dict[str, Any]) -> str:
    """A human, aligned rendering of one record."""
    state = record.get("state", "?")
    reason = record.get("reason")
    since = record.get("since")
    lines = [f"state:       {state}" + (f" ({reason})" if reason else "")]
    if since:
        lines.append(f"since:       {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}")
    fields = [
        ("mode", record.get("mode")),
        ("interface", record.get("interface")),
        (
            "tunnel",
            (
                f"{record.get('local')} (hub)"
                if record.get("hub")
                else f"{record.get('local')} -> {record.get('remote')}"
            )
            if record.get("local")
            else None,
        ),
        (
            "tunnel6",
            (
                f"{record.get('local6')} (hub)"
                if record.get("hub")
                else f"{record.get('local6')} -> {record.get('remote6')}"
            )
            if record.get("local6")
            else None,
        ),
        ("peer", record.get("peer")),
        ("key", record.get("key_fingerprint")),
        ("next key", record.get("next_key_fingerprint")),
        ("session key", record.get("session_key_fingerprint") if state == "up" else None),
        (
            "session age",
            _fmt_age(record.get("session_age"))
            if state == "up" and not record.get("hub")
            else None,
        ),
        ("rekeys", record.get("rekeys")),
        (
            "in",
            f"{record.get('packets_in', 0)} packets, {format_bytes(record.get('bytes_in', 0))}"
            if "packets_in" in record
            else None,
        ),
        (
            "out",
            f"{record.get('packets_out', 0)} packets, {format_bytes(record.get('bytes_out', 0))}"
            if "packets_out" in record
            else None,
        ),
        (
            "carrier",
            f"in {format_bytes(record.get('carrier_bytes_in', 0))}, "
            f"out {format_bytes(record.get('carrier_bytes_out', 0))}"
            if "carrier_bytes_in" in record
            else None,
        ),
        (
            "keepalive rtt",
            f"{record['last_rtt'] * 1000:.2f} ms" if record.get("last_rtt") is not None else None,
        ),
        ("missed", record.get("missed_keepalives")),
        ("reconnects", record.get("reconnects")),
        ("pid", record.get("pid")),
    ]
    for name, value in fields:
        if value is not None:
            lines.append(f"{name + ':':<12} {value}")
    drops = {k: v for k, v in (record.get("drops") or {}).items() if v}
    if drops:
        lines.append("drops:       " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items())))
    if record.get("hub"):
        lines.append(
            f"clients:     {record.get('peers_up', 0)} up of {record.get('peers_total', 0)}"
        )
        lines.extend(format_peers(record.get("peers") or []))
    return "\n".join(lines)


def format_peers(peers: list[dict[str, Any]]) -> list[str]:
    """A hub's clients, one aligned line each: what `vpnd status` shows under the hub."""
    header = ("CLIENT", "STATE", "ADDRESS", "ENDPOINT", "UPTIME", "RTT", "IN", "OUT", "KEY",
              "HANDSHAKE")  # fmt: skip
    rows = [header]
    for p in peers:
        rtt = p.get("last_rtt")
        shake = p.get("last_handshake")
        state = str(p.get("state", "?"))
        if p.get("reason") and state != "up":
            state += f" ({p['reason']})"
        rows.append(
            (
                str(p.get("name", "?")),
                state,
                str(p.get("address", "-")) + (f" {p['address6']}" if p.get("address6") else ""),
                str(p.get("peer") or "-"),
                _fmt_age(p.get("session_age")),
                f"{rtt * 1000:.2f}ms" if isinstance(rtt, (int, float)) else "-",
                format_bytes(int(p.get("bytes_in", 0)), compact=True),
                format_bytes(int(p.get("bytes_out", 0)), compact=True),
                str(p.get("key_fingerprint", "-")),
                time.strftime("%H:%M:%S", time.localtime(shake)) if shake else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
            for row in rows]  # fmt: skip


def print_status(config: Any, as_json: bool = False) -> int:
    """`vpnd status -f CONF`: print the record; exit 0 when the link is up, 1 otherwise."""
    record = read_status(config.statusfile)
    if as_json:
        sys.stdout.write(json.dumps(record, sort_keys=True, indent=2) + "\n")
    else:
        sys.stdout.write(format_status(record) + "\n")
    if record.get("hub"):
        return 0 if record.get("state") in ("up", "listening") else 1
    return 0 if record.get("state") == "up" else 1


# ---- Prometheus text format (node_exporter textfile, `vpnctl status --prometheus`) -----------

#: (name, type, help, record field or None, extra label) of each per-link metric; counters end
#: in _total. Fields missing from a record (or null) are left out, never invented.
_METRICS: tuple[tuple[str, str, str, str | None, tuple[str, str] | None], ...] = (
    ("vpnd_up", "gauge", "1 when the link is up (session established), else 0.", None, None),
    ("vpnd_state", "gauge", "1 for the link's current state, 0 for the others.", None, None),
    ("vpnd_state_since_timestamp_seconds", "gauge", "When the link entered its state.",
     "since", None),
    ("vpnd_status_updated_timestamp_seconds", "gauge", "When the daemon last wrote its status.",
     "updated", None),
    ("vpnd_session_age_seconds", "gauge", "Age of the current session.", "session_age", None),
    ("vpnd_keepalive_rtt_seconds", "gauge", "Round trip time of the last keepalive.",
     "last_rtt", None),
    ("vpnd_missed_keepalives", "gauge", "Keepalives unanswered in a row.",
     "missed_keepalives", None),
    ("vpnd_rekeys_total", "counter", "Session rekeys since the daemon started.", "rekeys", None),
    ("vpnd_reconnects_total", "counter", "Carrier reconnects since the daemon started.",
     "reconnects", None),
    ("vpnd_tunnel_bytes_total", "counter", "Tunnel-side IP bytes.", "bytes_in",
     ("direction", "in")),
    ("vpnd_tunnel_bytes_total", "counter", "Tunnel-side IP bytes.", "bytes_out",
     ("direction", "out")),
    ("vpnd_tunnel_packets_total", "counter", "Tunnel-side IP packets.", "packets_in",
     ("direction", "in")),
    ("vpnd_tunnel_packets_total", "counter", "Tunnel-side IP packets.", "packets_out",
     ("direction", "out")),
    ("vpnd_carrier_bytes_total", "counter", "Bytes on the carrier (TCP or serial), framing "
     "included.", "carrier_bytes_in", ("direction", "in")),
    ("vpnd_carrier_bytes_total", "counter", "Bytes on the carrier (TCP or serial), framing "
     "included.", "carrier_bytes_out", ("direction", "out")),
)  # fmt: skip
_EXTRA_STATES = ("not running", "stale")


def _label_value(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
    return "{" + inner + "}" if inner else ""


def _number(value: object) -> str | None:
    """A sample value, or None for anything that is not a finite number (never invented)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):  # NaN, inf: leave out
        return None
    return repr(value) if isinstance(value, float) else str(value)


def prometheus_text(ends: list[tuple[dict[str, str], dict[str, Any]]]) -> str:
    """The Prometheus text exposition of status records: ``ends`` pairs the labels of each
    link end (``link``, and ``host``/``role`` in a fleet) with its record. Each metric family
    gets its HELP and TYPE once, then one sample per end; ``vpnd_info`` carries the key
    fingerprint, mode and interface as labels. A per-client list in a hub record (``peers``)
    is not exported here."""
    families: dict[str, tuple[str, str, list[str]]] = {}

    def sample(name: str, kind: str, text: str, labels: dict[str, str], value: str) -> None:
        families.setdefault(name, (kind, text, []))[2].append(f"{name}{_labels(labels)} {value}")

    for labels, record in ends:
        state = str(record.get("state", "unknown"))
        for name, kind, text, key, extra in _METRICS:
            if name == "vpnd_up":
                sample(name, kind, text, labels, "1" if state == "up" else "0")
            elif name == "vpnd_state":
                for each in (*STATES, *_EXTRA_STATES):
                    sample(name, kind, text, {**labels, "state": each},
                           "1" if each == state else "0")  # fmt: skip
            elif key is not None:
                value = _number(record.get(key))
                if value is not None:
                    sample(name, kind, text, {**labels, **dict([extra])} if extra else labels,
                           value)  # fmt: skip
        drops = record.get("drops")
        if isinstance(drops, dict):
            for reason, count in sorted(drops.items()):
                value = _number(count)
                if value is not None:
                    sample("vpnd_drops_total", "counter", "Frames or packets dropped, by reason.",
                           {**labels, "reason": str(reason)}, value)  # fmt: skip
        info = {k: str(record[k]) for k in ("key_fingerprint", "mode", "interface")
                if isinstance(record.get(k), str)}  # fmt: skip
        if info:
            sample("vpnd_info", "gauge", "Constant 1; the link's key fingerprint, mode and "
                   "interface as labels.", {**labels, **info}, "1")  # fmt: skip
    out = []
    for name, (kind, text, lines) in families.items():
        out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *lines]
    return "\n".join(out) + "\n" if out else ""


def write_textfile(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file + rename, mode 0644), as node_exporter's
    textfile collector needs: it must never read half a file."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def link_name(config_path: str) -> str:
    """The link a config belongs to: its file name without ``.conf`` (``/etc/vpnd/lab.conf`` ->
    ``lab``), as vpnctl names the configs it renders."""
    name = os.path.basename(config_path)
    return name[: -len(".conf")] if name.endswith(".conf") else name


def print_prometheus(configs: list[Any], textfile: str | None = None) -> int:
    """``vpnd status --prometheus -f CONF...``: every link's record as Prometheus text, on
    stdout or atomically into ``textfile`` (a node_exporter textfile). Exit 0: the state is in
    the metrics, not the exit code."""
    ends = [({"link": link_name(c.source)}, read_status(c.statusfile)) for c in configs]
    text = prometheus_text(ends)
    if textfile is None:
        sys.stdout.write(text)
    else:
        write_textfile(textfile, text)
    return 0
