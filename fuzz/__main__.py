"""`python -m fuzz TARGET [libFuzzer options]`: run one coverage-guided fuzz target.

The vpnd/vpnctl modules are imported under atheris instrumentation (so libFuzzer sees their
branches); the stdlib and third-party code is not, which keeps each execution cheap.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Parse the target name, instrument our packages, hand the rest of argv to libFuzzer."""
    import atheris

    with atheris.instrument_imports(include=["vpnd_runtime", "vpnctl", "fuzz.contracts"]):
        from fuzz.contracts import TARGETS

    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m fuzz {{{'|'.join(TARGETS)}}} [libFuzzer options]")
    check = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
