"""Fleet timing: `vpnctl deploy --all` (first and no-change) and `vpnctl status` over a lab.

    python -m bench.bench_fleet [--hosts 20] [--jobs 8] [--json]

Builds a lab of `hosts` namespaced hosts (one server, hosts-1 clients, one link per client, each
host with its own sshd), runs keygen and render, then times with the real CLI:

* deploy --all, first time (runtime wheelhouse installed on every host, every link started and
  confirmed at both ends);
* deploy --all again (nothing changed: probe only);
* status (every link from both ends); the same with every ssh connection opened anew (the
  control masters closed first, as a minute after the last command); and status with one host
  unreachable (bounded wait).

The dependency wheel cache (~/.cache/vpnctl/wheels) is warmed before timing, so the first deploy
measures shipping and installing, not downloading. vpnctl's modules (and the runtime snapshot it
imports) are byte-compiled before timing too, as an installed vpnctl is: with
PYTHONDONTWRITEBYTECODE set, every vpnctl run would otherwise compile them again (~0.1-0.3 CPU-s
each). The ssh connections are opened by the first deploy and reused (ControlPersist) by the
later rows, as an operator's are within a minute. Needs root, iproute2 and OpenSSH.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vpnctl as vpnctl_package
from tests.helpers.lab import free_mgmt_net, runtime_snapshot, unique_tag, vpnctl
from vpnctl.deploy import build_runtime
from vpnctl.lab import LabState, lab_down, lab_up


def timed(state: LabState, *args: str, check: bool = True) -> tuple[float, str]:
    """Seconds one vpnctl invocation took, and its output."""
    started = time.monotonic()
    proc = vpnctl(state, *args, check=check, timeout=1800)
    return time.monotonic() - started, proc.stdout


def close_masters(state: LabState) -> None:
    """Close the lab's ssh control masters (the next command to each host connects anew)."""
    config = str(Path(state.directory) / "ssh_config")
    for host in state.hosts:
        subprocess.run(["ssh", "-F", config, "-O", "exit", host.name], capture_output=True,
                       timeout=10, check=False)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=20, help="lab hosts (server + clients)")
    parser.add_argument("--jobs", type=int, default=8, help="deploy/status parallelism")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_fleet: needs root (network namespaces)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="bfleet-") as tmp:
        build_runtime(Path(tmp) / "warm")  # fill the dependency wheel cache outside the timing
        for package in (Path(vpnctl_package.__file__).parent, Path(runtime_snapshot())):
            compileall.compile_dir(package, quiet=1)  # bytecode, as an installed vpnctl has
        directory = Path(tmp) / "lab"
        started = time.monotonic()
        state = lab_up(directory, clients=args.hosts - 1, tag=unique_tag("bf"),
                       mgmt_net=free_mgmt_net())  # fmt: skip
        figures: dict[str, float | int] = {
            "hosts": args.hosts,
            "links": args.hosts - 1,
            "jobs": args.jobs,
            "lab_up_s": round(time.monotonic() - started, 2),
        }
        try:
            vpnctl(state, "keygen")
            vpnctl(state, "render")
            jobs = ("--jobs", str(args.jobs))
            secs, out = timed(state, "deploy", "--all", *jobs, "--wait", "60")
            figures["deploy_first_s"] = round(secs, 2)
            figures["links_confirmed"] = out.count(": up at both ends")
            secs, out = timed(state, "deploy", "--all", *jobs)
            assert "no changes" in out, out
            figures["deploy_nochange_s"] = round(secs, 2)
            secs, out = timed(state, "status", "--jobs", "16")
            figures["status_s"] = round(secs, 2)
            figures["links_up"] = int(out.strip().splitlines()[-1].split("/")[0])
            close_masters(state)  # as after a minute: every host's ssh connection opened anew
            secs, _ = timed(state, "status", "--jobs", "16")
            figures["status_fresh_ssh_s"] = round(secs, 2)
            victim = state.hosts[-1]
            subprocess.run(["ip", "link", "set", victim.root_veth, "down"], check=True)
            secs, _ = timed(state, "status", "--jobs", "16", "--timeout", "5", check=False)
            figures["status_one_unreachable_s"] = round(secs, 2)
        finally:
            started = time.monotonic()
            lab_down(directory)
            figures["lab_down_s"] = round(time.monotonic() - started, 2)

    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"fleet of {figures['hosts']} lab hosts, {figures['links']} links, "
              f"{figures['jobs']} parallel jobs (nproc {os.cpu_count()})")  # fmt: skip
        rows = [
            ("lab up", "lab_up_s"),
            ("deploy --all (first: runtime + configs + keys)", "deploy_first_s"),
            ("deploy --all (no change)", "deploy_nochange_s"),
            ("status (all links, both ends)", "status_s"),
            ("status, every ssh connection opened anew", "status_fresh_ssh_s"),
            ("status, one host unreachable (--timeout 5)", "status_one_unreachable_s"),
            ("lab down", "lab_down_s"),
        ]
        for label, key in rows:
            if key in figures:
                print(f"  {label:<50} {figures[key]:>7.2f} s")
        print(f"  links confirmed by the first deploy: {figures.get('links_confirmed')}, "
              f"up in status: {figures.get('links_up')}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
