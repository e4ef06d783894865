"""One vpnd hub with many clients: memory, handshake rate, idle CPU and shared throughput.

    python -m bench.bench_hub [--clients 100,1000] [--idle 20] [--seconds 5] [--reps 3]
                              [--profile DIR]

Builds a star of namespaces around one hub (a real `vpnd` with a `peers` directory, one key per
client): a generator namespace whose veth carries a /22 of source addresses (198.18.4.0/22), and
four namespaces with one real `vpnd` client each. For each N it writes N peer files, starts the
hub and the four real clients, then runs `bench.hub_loadgen` in the generator namespace: N
clients played by the project's own protocol core (initiator, announcing their tunnel address),
one source address each, all kept alive (pings answered, rekeys done). Then it reports:

* hub RSS with N + 4 clients connected (VmRSS, and per generated client over the hub with only
  the four real clients);
* time from the first to the N-th generated client up, and handshakes per second over the ramp;
* hub CPU at idle with every client connected (utime + stime from /proc/PID/stat over `--idle`
  seconds, keepalive 10 everywhere), and whether every session survived that window;
* iperf3 throughput from one real client, then from all four at once (one stream each, both
  directions), with the ratio of the four-link sum to the single link.

Targets (issue 9) are printed next to the figures. `--profile DIR` also records the hub with
py-spy during the ramp and the idle window (speedscope files in DIR). Needs root, iproute2 and
iperf3; every namespace and temp dir is tagged and removed even on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.hub_loadgen import BENCH_RANGE, key_name, raise_fd_limit, source_address, tunnel_address
from tests.helpers.netns import Netns, VpndProcess, new_tag, poll_until, run, vpnd
from vpnd_runtime.keyfile import generate_key

HUB_PORT = 379
HUB_TUN = "198.19.0.1"
GEN_SOURCES = "198.18.4.0/22"  # the generator's carrier addresses (1,022 usable)
GEN_TUNNEL_NET = "198.19.16.0/20"  # the generated clients' tunnel addresses
REAL_CLIENTS = 4
KEEPALIVE = 10
IPERF_PORT = 5201
TARGETS = {"rss_mib": 60.0, "ramp_s": 10.0, "idle_cpu_pct": 5.0, "ratio": 0.9}


def real_tunnel(k: int) -> str:
    """Tunnel address of real client k (1-based)."""
    return f"198.19.1.{k + 1}"


# ---------------------------------------------------------------------- pure helpers
def parse_clients(text: str) -> list[int]:
    """`--clients 100,1000` -> [100, 1000]; each count from 1 to what the source range holds."""
    counts = []
    limit = 2 ** (32 - int(GEN_SOURCES.split("/")[1])) - 2
    for raw in text.split(","):
        part = raw.strip().replace("_", "")
        if not part.isdigit() or not 1 <= int(part) <= limit:
            raise argparse.ArgumentTypeError(f"--clients: {raw!r} is not a count 1..{limit}")
        counts.append(int(part))
    return counts


def cpu_ticks(stat_line: str) -> int:
    """utime + stime (clock ticks) from one /proc/PID/stat line (the name may hold spaces)."""
    fields = stat_line[stat_line.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), counted from 'state'


def run_delay_s(schedstat: str) -> float:
    """Seconds a task has waited runnable for a CPU, from /proc/PID/schedstat (field 2, ns)."""
    return int(schedstat.split()[1]) / 1e9


def cpu_percent(ticks_before: int, ticks_after: int, seconds: float, hz: int) -> float:
    """Share of one core used between two `cpu_ticks` readings `seconds` apart."""
    return 100.0 * (ticks_after - ticks_before) / hz / seconds


def vm_kib(status_text: str, field_name: str) -> int:
    """A `VmXxx:` figure in KiB from /proc/PID/status text (0 when absent)."""
    for line in status_text.splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def ramp_figures(ramp: dict) -> tuple[float | None, float | None]:
    """(seconds from the first to the last client up, handshakes per second over the ramp).

    The rate counts every client from the first connect (t = 0) to the last one up.
    """
    first, last, n = ramp.get("first_up"), ramp.get("last_up"), ramp.get("ever_up", 0)
    if first is None or last is None or not n:
        return None, None
    return last - first, (n / last if last > 0 else None)


def format_table(columns: list[str], rows: list[tuple[str, list[str], str]]) -> str:
    """A plain text table: a label column, one column per run, and the target column."""
    width = max(len(r[0]) for r in rows)
    cw = [max(len(c), *(len(r[1][i]) for r in rows)) for i, c in enumerate(columns)]
    head = (
        f"{'':<{width}}  "
        + "  ".join(f"{c:>{w}}" for c, w in zip(columns, cw, strict=True))
        + "  target"
    )
    lines = [head]
    for label, cells, target in rows:
        body = "  ".join(f"{c:>{w}}" for c, w in zip(cells, cw, strict=True))
        lines.append(f"{label:<{width}}  {body}  {target}".rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------- topology
@dataclass
class Star:
    """The hub's namespace and its spokes (each spoke: its own veth and /24 to the hub)."""

    tag: str
    hub: Netns
    gen: Netns
    gen_if: str
    real: list[Netns]
    hub_ip_for: dict[str, str] = field(default_factory=dict)  # namespace -> hub carrier address


def _veth(hub: Netns, hub_if: str, other: Netns, other_if: str, net: str) -> None:
    """One spoke: veth between `hub` (NET.1/24) and `other` (NET.2/24), both up."""
    run(
        "ip",
        "link",
        "add",
        hub_if,
        "netns",
        hub.name,
        "type",
        "veth",
        "peer",
        "name",
        other_if,
        "netns",
        other.name,
    )
    hub.run("ip", "addr", "add", f"{net}.1/24", "dev", hub_if)
    other.run("ip", "addr", "add", f"{net}.2/24", "dev", other_if)
    hub.run("ip", "link", "set", hub_if, "up")
    other.run("ip", "link", "set", other_if, "up")


@contextmanager
def star(tag: str, real_clients: int) -> Iterator[Star]:
    """Hub, generator and `real_clients` client namespaces; all removed on exit."""
    hub, gen = Netns(f"{tag}-h"), Netns(f"{tag}-g")
    real = [Netns(f"{tag}-r{k}") for k in range(1, real_clients + 1)]
    created: list[Netns] = []
    try:
        for ns in (hub, gen, *real):
            run("ip", "netns", "add", ns.name)
            created.append(ns)
            ns.run("ip", "link", "set", "lo", "up")
        s = Star(tag, hub, gen, f"{tag}g", real)
        _veth(hub, f"{tag}hg", gen, s.gen_if, "198.18.1")
        s.hub_ip_for[gen.name] = "198.18.1.1"
        for k, ns in enumerate(real, 1):
            _veth(hub, f"{tag}h{k}", ns, f"{tag}r{k}", f"198.18.{10 + k}")
            s.hub_ip_for[ns.name] = f"198.18.{10 + k}.1"
        yield s
    finally:
        for ns in created:
            run("ip", "netns", "del", ns.name, check=False)


def add_sources(gen: Netns, gen_if: str, hub: Netns, via: str, count: int) -> None:
    """Put `count` /32 source addresses from GEN_SOURCES on the generator's veth (one batch),
    and route the whole range back from the hub through `via`, the generator's main address
    (one neighbour entry on the hub instead of `count`)."""
    lines = "".join(
        f"addr add {source_address(GEN_SOURCES, i)}/32 dev {gen_if}\n" for i in range(count)
    )
    proc = subprocess.run(
        gen.cmd("ip", "-batch", "-"),
        input=lines,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"adding source addresses failed: {proc.stderr.strip()[:300]}")
    hub.run("ip", "route", "add", GEN_SOURCES, "via", via)


# ---------------------------------------------------------------------- configs
def make_keys(keydir: Path, count: int) -> None:
    """Generated clients' keys c0000.key.. and the real clients' r1.key.. (missing ones only)."""
    keydir.mkdir(exist_ok=True)
    names = [key_name(i) for i in range(count)] + [f"r{k}.key" for k in range(1, 5)]
    for name in names:
        if not (keydir / name).exists():
            generate_key(keydir / name, randomdev="/dev/urandom")


def write_hub(work: Path, s: Star, n: int, keydir: Path) -> Path:
    """The hub config and a fresh peers directory with `n` generated and the real clients."""
    peers = work / f"peers-{n}"
    peers.mkdir()
    for i in range(n):
        name = key_name(i).removesuffix(".key")
        (peers / f"{name}.peer").write_text(
            f"remote {tunnel_address(GEN_TUNNEL_NET, i)}\nkeyfile {keydir / key_name(i)}\n"
        )
    for k in range(1, len(s.real) + 1):
        (peers / f"r{k}.peer").write_text(f"remote {real_tunnel(k)}\nkeyfile {keydir}/r{k}.key\n")
    conf = work / f"hub-{n}.conf"
    conf.write_text(
        f"mode server\nserver 0 {HUB_PORT}\nlocal {HUB_TUN}\npeers {peers}\n"
        f"interface {s.tag}t\nkeepalive {KEEPALIVE}\nnoanswer 3\nkeyttl 120\n"
        f"cipher chacha20-poly1305\nrandomdev /dev/urandom\n"
        f"statusfile {work}/hub-{n}.status.json\n"
    )
    return conf


def write_real_client(work: Path, s: Star, k: int, keydir: Path) -> Path:
    """Real client k's config: an ordinary client of the hub (its peer file's key and address)."""
    ns = s.real[k - 1]
    conf = work / f"r{k}.conf"
    conf.write_text(
        f"mode client\nserver {s.hub_ip_for[ns.name]} {HUB_PORT}\nlocal {real_tunnel(k)}\n"
        f"remote {HUB_TUN}\nkeyfile {keydir}/r{k}.key\ninterface {s.tag}t\n"
        f"keepalive {KEEPALIVE}\nnoanswer 3\nkeyttl 120\ncipher chacha20-poly1305\n"
        f"randomdev /dev/urandom\nstatusfile {work}/r{k}.status.json\n"
    )
    return conf


def read_record(path: Path) -> dict:
    """The hub's status file ({} while it is not there or half written)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------- the load generator
class Generator:
    """`bench.hub_loadgen` running in the generator namespace, spoken to in JSON lines."""

    def __init__(self, ns: Netns, hub: str, keydir: Path, n: int, *options: str) -> None:
        argv = ns.cmd(
            sys.executable,
            "-m",
            "bench.hub_loadgen",
            "--hub",
            f"{hub}:{HUB_PORT}",
            "--keydir",
            str(keydir),
            "--clients",
            str(n),
            "--sources",
            GEN_SOURCES,
            "--tunnel-net",
            GEN_TUNNEL_NET,
            *options,
        )
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        self.lines: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.lines.put(json.loads(line))
        self.lines.put({"event": "exited", "rc": self.proc.wait()})

    def expect(self, event: str, timeout: float) -> dict:
        """The next line of kind `event` (fails on exit or after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"load generator: no {event!r} in {timeout:.0f} s") from None
            if msg["event"] == event:
                return msg
            if msg["event"] == "exited":
                raise AssertionError(f"load generator exited ({msg['rc']}) before {event!r}")

    def status(self) -> dict:
        """The generator's current counts."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("status\n")
        self.proc.stdin.flush()
        return self.expect("status", 30)

    def stop(self) -> dict | None:
        """Close every session (stdin EOF) and wait for the goodbye; kill if it hangs."""
        bye = None
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            with contextlib.suppress(AssertionError):
                bye = self.expect("bye", 30)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return bye


@contextmanager
def generator(ns: Netns, hub: str, keydir: Path, n: int, *options: str) -> Iterator[Generator]:
    """Run the load generator in `ns` against `hub` for the block; stop it (by PID) on exit.

    `options` are more `bench.hub_loadgen` arguments (keepalive, ramp timeout, window)."""
    g = Generator(ns, hub, keydir, n, *options)
    try:
        yield g
    finally:
        g.stop()


# ---------------------------------------------------------------------- measurements
def iperf_at_once(s: Star, clients: list[int], seconds: int, reverse: bool) -> list[float]:
    """Mbit/s of one iperf3 stream per real client, all running at the same time."""
    servers = [
        subprocess.Popen(
            s.hub.cmd("iperf3", "-s", "-1", "-B", HUB_TUN, "-p", str(IPERF_PORT + k)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for k in clients
    ]
    try:
        ports = [f":{IPERF_PORT + k} " for k in clients]
        poll_until(
            lambda: all(p in s.hub.run("ss", "-ltnH").stdout for p in ports),
            10,
            what="iperf3 servers listening",
        )
        runs = [
            subprocess.Popen(
                s.real[k - 1].cmd(
                    "iperf3",
                    "-c",
                    HUB_TUN,
                    "-p",
                    str(IPERF_PORT + k),
                    "-t",
                    str(seconds),
                    "-J",
                    *(["-R"] if reverse else []),
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for k in clients
        ]
        results = []
        for proc in runs:
            out, _ = proc.communicate(timeout=seconds + 60)
            results.append(json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6)
        return results
    finally:
        for server in servers:
            if server.poll() is None:
                server.kill()
            server.wait()


def throughput(s: Star, seconds: int, reps: int) -> dict[str, float]:
    """Median single-link and four-link (sum) Mbit/s, clients->hub ('up') and hub->clients."""
    out: dict[str, float] = {}
    every = list(range(1, len(s.real) + 1))
    for direction, reverse in (("up", False), ("down", True)):
        one = [iperf_at_once(s, [1], seconds, reverse)[0] for _ in range(reps)]
        many = [sum(iperf_at_once(s, every, seconds, reverse)) for _ in range(reps)]
        out[f"one_{direction}"] = statistics.median(one)
        out[f"all_{direction}"] = statistics.median(many)
    return out


def hub_cpu_percent(pid: int, seconds: float) -> float:
    """The hub's CPU use over a window of `seconds` (a measurement window, not a wait)."""
    hz = os.sysconf("SC_CLK_TCK")
    stat = Path(f"/proc/{pid}/stat")
    t0, c0 = time.monotonic(), cpu_ticks(stat.read_text())
    time.sleep(seconds)
    t1, c1 = time.monotonic(), cpu_ticks(stat.read_text())
    return cpu_percent(c0, c1, t1 - t0, hz)


def py_spy_path() -> str | None:
    """The py-spy executable (PATH, or next to this Python), None when not installed."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return spy if Path(spy).exists() else None


@contextmanager
def py_spy(pid: int, out: Path | None, seconds: float) -> Iterator[None]:
    """Record the hub with py-spy (speedscope file `out`) for the block; no-op without `out`."""
    spy = py_spy_path()
    if out is None or spy is None:
        yield
        return
    proc = subprocess.Popen(
        [spy, "record", "--nonblocking", "-p", str(pid), "-d", str(int(seconds)), "-r", "200",
         "-f", "speedscope",
         "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes what it has recorded so far
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_hub(stack: ExitStack, s: Star, conf: Path, work: Path, n: int) -> VpndProcess:
    """Start the hub and wait until it serves (fails with its log when it cannot)."""
    hub = stack.enter_context(vpnd(s.hub, conf, work, f"hub-{n}"))
    record = work / f"hub-{n}.status.json"

    def serving() -> bool:
        if hub.proc.poll() is not None:
            raise RuntimeError(f"the hub exited ({hub.proc.returncode}):\n{hub.log()[-1500:]}")
        return read_record(record).get("state") in ("listening", "up")

    poll_until(serving, 30, what="hub listening")
    return hub


def run_one(s: Star, work: Path, keydir: Path, n: int, args: argparse.Namespace) -> dict:
    """Every figure for one N."""
    fig: dict = {"n": n}
    conf = write_hub(work, s, n, keydir)
    record = work / f"hub-{n}.status.json"
    with ExitStack() as stack:
        hub = start_hub(stack, s, conf, work, n)
        reals = [
            stack.enter_context(vpnd(ns, write_real_client(work, s, k, keydir), work, f"r{k}-{n}"))
            for k, ns in enumerate(s.real, 1)
        ]
        poll_until(lambda: all(r.state() == "up" for r in reals), 30, what="real clients up")
        fig["rss_base_kib"] = vm_kib(Path(f"/proc/{hub.pid}/status").read_text(), "VmRSS")
        prof = Path(args.profile) if args.profile else None
        options = ["--keepalive", str(KEEPALIVE), "--ramp-timeout", str(args.ramp_timeout),
                   "--inflight", str(args.inflight)]  # fmt: skip
        stat, sched = Path(f"/proc/{hub.pid}/stat"), Path(f"/proc/{hub.pid}/schedstat")
        with py_spy(hub.pid, prof / f"hub-ramp-{n}.json" if prof else None, args.ramp_timeout):
            gen = stack.enter_context(generator(s.gen, "198.18.1.1", keydir, n, *options))
            gen.expect("ready", 60)
            ticks, waited = cpu_ticks(stat.read_text()), run_delay_s(sched.read_text())
            ramp = gen.expect("ramp", args.ramp_timeout + 30)
            ticks = cpu_ticks(stat.read_text()) - ticks
            fig["ramp_cpu_wait_s"] = run_delay_s(sched.read_text()) - waited
        fig["ramp"] = ramp
        # CPU time, not wall time: what each handshake costs the hub however busy the machine is
        fig["hub_cpu_ms_per_hs"] = 1e3 * ticks / os.sysconf("SC_CLK_TCK") / max(1, ramp["ever_up"])
        fig["ramp_s"], fig["hs_per_s"] = ramp_figures(ramp)
        poll_until(
            lambda: read_record(record).get("peers_up", 0) >= ramp["up"] + len(reals),
            30,
            what="the hub counting every client up",
        )
        time.sleep(3)  # let the last handshakes' work settle before the idle window
        fig["idle_cpu_pct"] = hub_cpu_percent(hub.pid, args.idle)
        fig["after_idle"] = gen.status()
        status = Path(f"/proc/{hub.pid}/status").read_text()
        fig["rss_kib"], fig["hwm_kib"] = vm_kib(status, "VmRSS"), vm_kib(status, "VmHWM")
        fig["hub_peers_up"] = read_record(record).get("peers_up")
        if prof:  # a separate window: the sampler's own cost stays out of the CPU figure
            with py_spy(hub.pid, prof / f"hub-idle-{n}.json", args.idle):
                time.sleep(args.idle)
        fig.update(throughput(s, args.seconds, args.reps))
        fig["final"] = gen.status()
        fig["hub_alive"] = hub.proc.poll() is None
    return fig


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(figs: list[dict]) -> str:
    """The table and the notes under it."""
    cols = [f"N={f['n']:,}" for f in figs]
    ratio = {
        d: [f[f"all_{d}"] / f[f"one_{d}"] if f.get(f"one_{d}") else None for f in figs]
        for d in ("up", "down")
    }
    rows = [
        ("generated clients up / N", [f"{f['ramp']['up']}/{f['n']}" for f in figs], ""),
        (
            "hub RSS (MiB)",
            [_fmt(f["rss_kib"] / 1024, ".1f") for f in figs],
            f"<= {TARGETS['rss_mib']:.0f} at 1,000",
        ),
        ("  peak so far (VmHWM, MiB)", [_fmt(f["hwm_kib"] / 1024, ".1f") for f in figs], ""),
        (
            "hub RSS, 4 real clients only (MiB)",
            [_fmt(f["rss_base_kib"] / 1024, ".1f") for f in figs],
            "",
        ),
        (
            "hub RSS per generated client (KiB)",
            [_fmt((f["rss_kib"] - f["rss_base_kib"]) / f["n"], ".1f") for f in figs],
            "",
        ),
        (
            "first -> N-th client up (s)",
            [_fmt(f["ramp_s"], ".2f") for f in figs],
            f"<= {TARGETS['ramp_s']:.0f}",
        ),
        (
            "handshakes/s (N / first connect -> N-th up)",
            [_fmt(f["hs_per_s"], ".0f") for f in figs],
            "",
        ),
        (
            "hub CPU per handshake over the ramp (ms)",
            [_fmt(f["hub_cpu_ms_per_hs"], ".2f") for f in figs],
            "",
        ),
        (
            "  of the ramp, hub runnable but waiting for a CPU (s)",
            [_fmt(f["ramp_cpu_wait_s"], ".2f") for f in figs],
            "",
        ),
        (
            "handshake tries that failed",
            [str(sum(f["ramp"]["failures"].values())) for f in figs],
            "",
        ),
        (
            "hub CPU idle, keepalive 10 (% of a core)",
            [_fmt(f["idle_cpu_pct"], ".2f") for f in figs],
            f"<= {TARGETS['idle_cpu_pct']:.0f}",
        ),
        (
            "sessions lost (to the end of the run)",
            [str(sum(f["final"]["lost"].values())) for f in figs],
            "0",
        ),
        ("iperf3 1 link, clients->hub (Mbit/s)", [_fmt(f["one_up"], ",.0f") for f in figs], ""),
        ("iperf3 4 links, clients->hub (Mbit/s)", [_fmt(f["all_up"], ",.0f") for f in figs], ""),
        (
            "  ratio 4 links / 1 link",
            [_fmt(r, ".2f") for r in ratio["up"]],
            f">= {TARGETS['ratio']}",
        ),
        ("iperf3 1 link, hub->clients (Mbit/s)", [_fmt(f["one_down"], ",.0f") for f in figs], ""),
        ("iperf3 4 links, hub->clients (Mbit/s)", [_fmt(f["all_down"], ",.0f") for f in figs], ""),
        (
            "  ratio 4 links / 1 link",
            [_fmt(r, ".2f") for r in ratio["down"]],
            f">= {TARGETS['ratio']}",
        ),
        (
            "load generator CPU during the ramp (s)",
            [_fmt(f["ramp"]["cpu_s"], ".2f") for f in figs],
            "",
        ),
    ]
    notes = []
    for f in figs:
        for what, counts in (
            ("handshake failures", f["ramp"]["failures"]),
            ("sessions lost", f["final"]["lost"]),
        ):
            if counts:
                notes.append(f"N={f['n']}: {what}: {counts}")
        if f["hub_peers_up"] is not None and f["hub_peers_up"] != f["after_idle"]["up"] + 4:
            notes.append(
                f"N={f['n']}: hub says {f['hub_peers_up']} peers up, "
                f"generator {f['after_idle']['up']} + 4 real"
            )
    return "\n".join([format_table(cols, rows), *notes])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=parse_clients, default=parse_clients("100,1000"))
    ap.add_argument("--idle", type=float, default=20.0, help="idle CPU window (s)")
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 -t")
    ap.add_argument("--reps", type=int, default=3, help="iperf3 runs per figure (median)")
    ap.add_argument("--ramp-timeout", type=float, default=60.0)
    ap.add_argument("--inflight", type=int, default=16, help="generator's handshakes at once")
    ap.add_argument("--profile", help="directory for py-spy recordings of the hub")
    ap.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_hub: needs root (network namespaces)", file=sys.stderr)
        return 2
    for tool in ("ip", "iperf3", "ss"):
        if not shutil.which(tool):
            print(f"bench_hub: needs {tool}", file=sys.stderr)
            return 2
    assert all(
        ipaddress.ip_network(net).subnet_of(BENCH_RANGE)
        for net in (GEN_SOURCES, "198.18.1.0/24", "198.18.11.0/24")
    )
    if args.profile:
        if py_spy_path() is None:
            print("bench_hub: --profile needs py-spy (pip install -e '.[bench]')", file=sys.stderr)
            return 2
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    raise_fd_limit(max(args.clients) + 256)
    tag = new_tag("vh")
    figs = []
    failed = False
    with tempfile.TemporaryDirectory(prefix=f"{tag}-") as tmp:
        work = Path(tmp)
        keydir = work / "keys"
        make_keys(keydir, max(args.clients))
        with star(tag, REAL_CLIENTS) as s:
            add_sources(s.gen, s.gen_if, s.hub, "198.18.1.2", max(args.clients))
            for n in args.clients:
                try:
                    figs.append(run_one(s, work, keydir, n, args))
                except (RuntimeError, AssertionError) as exc:
                    print(f"bench_hub: N={n}: {exc}", file=sys.stderr)
                    failed = True
                    break
    if not figs:
        return 1
    print(
        f"one hub (vpnd, keepalive {KEEPALIVE}), N generated clients (protocol core, one "
        f"source address each) + {REAL_CLIENTS} real vpnd clients; iperf3 -t {args.seconds}, "
        f"median of {args.reps}; idle CPU over {args.idle:g} s"
    )
    print(report(figs))
    if args.json:
        print(json.dumps(figs, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
