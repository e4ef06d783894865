"""Fleet timing: `vpnctl deploy --all` (first and no-change) and `vpnctl status` over a lab.

    python -m bench.bench_fleet [--hosts 20] [--jobs 8] [--json]

Builds a lab of `hosts` namespaced hosts (one server, hosts-1 clients, one link per client, each
host with its own sshd), runs keygen and render, then times with the real CLI:

* deploy --all, first time (runtime wheelhouse installed on every host, every link started and
  confirmed at both ends);
* deploy --all again (nothing changed: probe only);
* status (every link from both ends), and status with one host unreachable (bounded wait).

The dependency wheel cache (~/.cache/vpnctl/wheels) is warmed before timing, so the first deploy
measures shipping and installing, not downloading. Needs root, iproute2 and OpenSSH.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers.lab import free_mgmt_net, unique_tag, vpnctl
from vpnctl.deploy import build_runtime
from vpnctl.lab import LabState, lab_down, lab_up


def timed(state: LabState, *args: str, check: bool = True) -> tuple[float, str]:
    """Seconds one vpnctl invocation took, and its output."""
    started = time.monotonic()
    proc = vpnctl(state, *args, check=check, timeout=1800)
    return time.monotonic() - started, proc.stdout


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
