"""`make bench`: every benchmark in one run, each printing its own figures and ratios.

    python -m bench.run_all

The core benchmark runs anywhere; the tunnel and fleet benchmarks need root (namespaces, TUN,
sshd) and say so instead of failing when they cannot run.
"""

from __future__ import annotations

import importlib
import os
import sys

BENCHES = [
    ("protocol core in memory", "bench.bench_core"),
    ("tunnel throughput and latency", "bench.bench_tunnel"),
    ("the Python floor beside vpnd", "bench.floor"),
    ("tunnel over a serial line", "bench.bench_serial"),
    ("fleet deploy and status", "bench.bench_fleet"),
    ("one hub, many clients", "bench.bench_hub"),
]


def main() -> int:
    failed = 0
    for title, module in BENCHES:
        print(f"\n=== {title} ({module}) ===", flush=True)
        if module != "bench.bench_core" and os.geteuid() != 0:
            print("skipped: needs root (network namespaces)")
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            print(f"skipped: {exc}")
            continue
        failed += 1 if mod.main([]) else 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
