"""One end's config of the two-namespace test links (tests/e2e/test_tunnel_tcp.py, _udp, _ipv6)."""

from __future__ import annotations

import textwrap
from pathlib import Path


def write_conf(
    directory: Path, role: str, body: str, *, tag: str, key: str = "shared.key", extra: str = ""
) -> Path:
    """Write ``<directory>/<role>.conf`` and return its path: ``body`` (this end's own directives,
    dedented), then what every end of these links has (interface ``<tag>t``, the key file
    ``key`` in ``directory``, a pidfile and a status file named after the role, /dev/urandom),
    then ``extra`` (dedented): a test's own directives."""
    path = directory / f"{role}.conf"
    path.write_text(
        textwrap.dedent(body)
        + f"interface {tag}t\n"
        + f"keyfile {directory / key}\n"
        + f"pidfile {directory / role}.pid\n"
        + f"statusfile {directory / role}.status.json\n"
        + "randomdev /dev/urandom\n"
        + textwrap.dedent(extra)
    )
    return path
