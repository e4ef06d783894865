"""Run every fuzz target for a bounded time and report executions per second (`make fuzz`).

Each target runs in its own process (`python -m fuzz TARGET`) for FUZZ_SECONDS seconds (default
60), the frame decoder for FUZZ_FRAMES_SECONDS (default 2 x FUZZ_SECONDS: it is the target with
the widest input space and must reach 10^6 executions in one `make fuzz`).  The corpus grows in
build/fuzz/corpus/TARGET (kept between runs, not committed), seeded from fuzz/seeds/TARGET.  A
crash leaves its input in build/fuzz/crashes/ and makes this exit non-zero; it then becomes a
file in fuzz/regressions/TARGET/ (replayed by tests/unit/test_fuzz_regressions.py) and gets fixed.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

from fuzz.contracts import TARGETS

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "fuzz"


#: libFuzzer's -max_len per target (default 4096).  The frame decoder's branches all show up in
#: short inputs (lengths are header values, not real sizes), and short inputs keep it fast.
MAX_LEN = {"frames": 512}


def seconds_for(target: str) -> int:
    """How long `target` runs (FUZZ_SECONDS, and FUZZ_FRAMES_SECONDS for the frame decoder)."""
    base = int(os.environ.get("FUZZ_SECONDS", "60"))
    if target == "frames":
        return int(os.environ.get("FUZZ_FRAMES_SECONDS", str(2 * base)))
    return base


def run(target: str) -> tuple[bool, int, int, float, str]:
    """Fuzz one target; return (clean, executions, executions per second, CPU seconds used,
    last lines).  On a shared machine exec/s says more about the neighbours than about the
    harness; executions per CPU second do not."""
    corpus = BUILD / "corpus" / target
    crashes = BUILD / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    seeds = ROOT / "fuzz" / "seeds" / target
    cmd = [
        sys.executable,
        "-m",
        "fuzz",
        target,
        f"-max_total_time={seconds_for(target)}",
        "-print_final_stats=1",
        "-rss_limit_mb=1024",
        "-timeout=10",
        f"-artifact_prefix={crashes}/{target}-",
        str(corpus),
    ]
    if target in MAX_LEN:
        cmd.insert(-1, f"-max_len={MAX_LEN[target]}")
    if seeds.is_dir():
        cmd.append(str(seeds))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    log = proc.stderr + proc.stdout
    (BUILD / f"{target}.log").write_text(log)
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
    rate = re.search(r"stat::average_exec_per_sec:\s*(\d+)", log)
    tail = "\n".join(log.strip().splitlines()[-25:])
    return (
        proc.returncode == 0,
        int(runs[1]) if runs else 0,
        int(rate[1]) if rate else 0,
        cpu,
        tail,
    )


def main() -> int:
    """Run the targets named on the command line (default: all); print one line each."""
    names = sys.argv[1:] or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        print(f"unknown target(s): {', '.join(unknown)}; known: {', '.join(TARGETS)}")
        return 2
    failed = []
    print(
        f"{'TARGET':<10} {'SECONDS':>7} {'EXECUTIONS':>11} {'EXEC/S':>7} {'CPU S':>6} "
        f"{'EXEC/CPU-S':>10}  RESULT",
        flush=True,
    )
    for name in names:
        clean, runs, rate, cpu, tail = run(name)
        result = "clean" if clean else f"FAILED (see {BUILD / name}.log)"
        per_cpu = int(runs / cpu) if cpu > 0 else 0
        print(
            f"{name:<10} {seconds_for(name):>7} {runs:>11} {rate:>7} {cpu:>6.1f} {per_cpu:>10}  "
            f"{result}",
            flush=True,
        )
        if not clean:
            failed.append(name)
            print(tail, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
