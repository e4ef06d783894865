"""`python -m fuzz TARGET [libFuzzer options]`: run one coverage-guided fuzz target.

The modules under test are imported under atheris instrumentation (so libFuzzer sees their
branches); the harness, the stdlib and third-party code are not, which keeps each execution cheap.
"""

from __future__ import annotations

import sys

#: The modules whose branches guide each target: only the code under test, not the harness or the
#: parts it merely calls, so an execution spends its time in the target and not in tracing.
INSTRUMENT: dict[str, list[str]] = {
    "frames": ["vpnd_runtime.proto"],
    "handshake": ["vpnd_runtime.proto"],
    "slip": ["vpnd_runtime.proto.slip"],
    "config": ["vpnd_runtime.config"],
    "inventory": ["vpnctl.inventory"],
    "status": ["vpnctl.deploy", "vpnctl.fleetstatus", "vpnd_runtime.status"],
    "probe": ["vpnctl.deploy"],
}


def main() -> None:
    """Parse the target name, instrument our packages, hand the rest of argv to libFuzzer."""
    import atheris

    target = sys.argv[1] if len(sys.argv) > 1 else ""
    if target not in INSTRUMENT:
        sys.exit(f"usage: python -m fuzz {{{'|'.join(INSTRUMENT)}}} [libFuzzer options]")
    with atheris.instrument_imports(include=INSTRUMENT[target]):
        from fuzz.contracts import TARGETS

    check = TARGETS[target]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
