"""Errors of the sans-I/O protocol core, split by who is to blame.

`LocalProtocolError` means the caller misused the API (sending before the link is up, calling a
method on a connection that already failed).  `RemoteProtocolError` means the bytes that came from
the peer are unacceptable (bad frame, bad tag, replay, wrong key, ...).  After either one is raised
from a `Connection` method that processes input, the connection is in `State.ERROR` and stays there.

`reason` is a short human sentence for logs and the status record.  It never contains key
material or plaintext.  A RemoteProtocolError raised by `Connection.receive_data` also carries
`events`: the events completed by the same call before the bad message (usually not needed,
since the connection is over).
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of every error raised by `vpnd_runtime.proto`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LocalProtocolError(ProtocolError):
    """The caller used the API wrongly; the peer did nothing wrong."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something we must not accept; the connection cannot go on."""
