"""The runtime on the oldest Python it supports: run by tests/unit/test_runtime_py39.py with the
interpreter of a fresh venv into which deploy's wheelhouse for that Python was unpacked by
``tools/wheel_install.py`` (as on a host), beside ``tests/unit/test_proto_pair.py``.

Imports every module of ``vpnd_runtime`` (a 3.10+ construct evaluated at import fails here),
then runs a whole protocol session in memory: handshake, packets both ways with compression
(zlib's raw deflate), a rekey, and a status record written and read back. Prints one line
``runtime-smoke ok <python> <modules>``; any failure is a traceback and exit status 1.

Kept to Python 3.9 (ruff checks it as such: pyproject.toml per-file-target-version), stdlib and
the runtime only: no pytest on the interpreter under test.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import tempfile


def main() -> int:
    """Run the smoke checks; exit status 0 when all pass."""
    import vpnd_runtime

    names = ["vpnd_runtime"] + [
        m.name for m in pkgutil.walk_packages(vpnd_runtime.__path__, "vpnd_runtime.")
    ]
    for name in names:
        if name != "vpnd_runtime.__main__":  # __main__ runs the daemon's CLI
            importlib.import_module(name)

    from test_proto_pair import Pair  # beside this file (tests/unit/test_proto_pair.py)

    from vpnd_runtime.proto import Params

    pair = Pair(Params(compress=True, compress_level=6, keyttl=30.0))
    pair.handshake()
    payloads = [bytes(range(256)) * 8, b"x" * 1400, bytes(40)]
    pair.i.send_packets(payloads, pair.now)
    pair.r.send_packets(payloads[::-1], pair.now)
    pair.pump()
    assert Pair.packets(pair.events_r) == payloads, "initiator -> responder"
    assert Pair.packets(pair.events_i) == payloads[::-1], "responder -> initiator"
    pair.advance(pair.now + 45.0)  # past keyttl: both ends rekey, the link stays up
    pair.i.send_packets([b"after the rekey"], pair.now)
    pair.pump()
    assert Pair.packets(pair.events_r)[-1] == b"after the rekey"

    from vpnd_runtime import status

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/l1.status.json"
        record = status.StatusRecord("l1.conf", "client", "vpnd0", "198.19.0.2", "198.19.0.1",
                                     "0000-0000-0000-0000", state="up")  # fmt: skip
        status.StatusWriter(path).write(record)
        back = status.read_status(path)
        assert back["state"] == "up" and back["local"] == "198.19.0.2", back
        assert "198.19.0.1" in status.format_status(back)
        peer = {"name": "c1", "state": "up", "address": "198.19.0.9", "last_rtt": 0.01}
        assert status.format_peers([peer])[1].split()[0] == "c1"
    print("runtime-smoke ok", ".".join(map(str, sys.version_info[:3])), len(names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
