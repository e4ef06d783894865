"""Fleet key rotation timing: `vpnctl rotate --all` over a lab of N links.

    python -m bench.bench_rotate [--links 10] [--rounds 1] [--json]

Builds a lab of one server host and ``links`` client hosts (one link each, every host with its
own sshd, as bench_fleet does), runs keygen, render and a first `deploy --all`, then times
`vpnctl rotate --all` (each link's three steps: accept, switch, retire, every step deployed and
confirmed at both ends) ``rounds`` times with the real CLI, and checks afterwards that every link
is up on its new key with no daemon restarted. The dependency wheel cache is warmed and vpnctl
byte-compiled before timing, as in bench_fleet. Needs root, iproute2 and OpenSSH.

To compare with another version of vpnctl, run this file with that version first on
PYTHONPATH (the vpnctl runs it starts inherit PYTHONPATH).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import vpnctl as vpnctl_package
from tests.helpers.lab import daemon_pids, free_mgmt_net, runtime_snapshot, unique_tag, vpnctl
from vpnctl.deploy import build_runtime
from vpnctl.lab import lab_down, lab_up


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", type=int, default=10, help="links (one client host each)")
    parser.add_argument("--rounds", type=int, default=1, help="rotate --all runs to time")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_rotate: needs root (network namespaces)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="brot-") as tmp:
        build_runtime(Path(tmp) / "warm")  # fill the dependency wheel cache outside the timing
        for package in (Path(vpnctl_package.__file__).parent, Path(runtime_snapshot())):
            compileall.compile_dir(package, quiet=1)
        directory = Path(tmp) / "lab"
        state = lab_up(directory, clients=args.links, tag=unique_tag("br"),
                       mgmt_net=free_mgmt_net())  # fmt: skip
        figures: dict[str, object] = {
            "links": args.links,
            "hosts": args.links + 1,
            "vpnctl": str(Path(vpnctl_package.__file__).parent),
            "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
        }
        rounds: list[float] = []
        try:
            vpnctl(state, "keygen")
            vpnctl(state, "render")
            vpnctl(state, "deploy", "--all", "--wait", "60", timeout=1800)
            pids = daemon_pids(state)
            for _ in range(args.rounds):
                started = time.monotonic()
                proc = vpnctl(state, "rotate", "--all", "--wait", "60", "--json",
                              check=False, timeout=1800)  # fmt: skip
                rounds.append(round(time.monotonic() - started, 2))
                doc = json.loads(proc.stdout) if proc.stdout.strip() else {}
                rotated = sum(r.get("result") == "rotated" for r in doc.get("links", []))
                if proc.returncode != 0 or rotated != args.links:
                    print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"rotate --all failed: {rotated}/{args.links} rotated")
            figures["daemons_restarted"] = sum(
                1 for key, pid in daemon_pids(state).items() if pids.get(key) != pid
            )
            status = json.loads(vpnctl(state, "status", "--json", check=False).stdout)
            figures["links_up"] = sum(
                all(e["state"] == "up" for e in entry["ends"]) for entry in status["links"]
            )
        finally:
            lab_down(directory)
    figures["rotate_all_s"] = rounds
    figures["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"rotate --all over {args.links} links ({args.links + 1} lab hosts), "
              f"vpnctl from {figures['vpnctl']}")  # fmt: skip
        for i, secs in enumerate(rounds, 1):
            print(f"  round {i}: {secs:7.2f} s ({secs / args.links:.2f} s per link)")
        print(f"  links up afterwards: {figures['links_up']}/{args.links}, daemons restarted: "
              f"{figures['daemons_restarted']}, loadavg {' '.join(figures['loadavg_before'])} "
              f"-> {' '.join(figures['loadavg_after'])}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
