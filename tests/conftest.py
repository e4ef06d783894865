"""Shared fixtures. A missing prerequisite skips on a laptop but fails under CI=true."""

from __future__ import annotations

import os
import shutil
import socket

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require(condition: bool, reason: str) -> None:
    """Skip the calling test when `condition` is false; under CI a missing prerequisite fails."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing under CI: {reason}")
    pytest.skip(reason)


def require_root_netns() -> None:
    """The test needs root, network namespaces and /dev/net/tun."""
    require(os.geteuid() == 0, "needs root")
    require(shutil.which("ip") is not None, "needs iproute2 (ip)")
    require(os.path.exists("/dev/net/tun"), "needs /dev/net/tun")


def require_tools(*tools: str) -> None:
    """The test needs these executables on PATH."""
    for tool in tools:
        require(shutil.which(tool) is not None, f"needs {tool}")


def pypi_reachable() -> bool:
    """Whether pypi.org answers on port 443 within 3 s: the tests that build a runtime
    wheelhouse for another Python fetch its wheels there."""
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
    except OSError:
        return False
    return True
