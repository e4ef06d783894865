"""A session (one carrier connection and the protocol riding on it), and what a config gives it.

`params_from_config` turns a config into the protocol core's parameters (equal on both ends of a
link); `load_table` reads the peers of a config with their keys. The daemon and its two doors
(`dialer.py` for the end that opens the carrier, `acceptor.py` for the end that waits) build
sessions from these.
"""

from __future__ import annotations

import os
from collections.abc import Container
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vpnd_runtime.config import Config
from vpnd_runtime.io import tcp
from vpnd_runtime.io.tun import VNET_HDR_LEN
from vpnd_runtime.keyfile import fingerprint, load_key, user_uid
from vpnd_runtime.peers import Peer, PeerTable
from vpnd_runtime.proto.connection import Connection, Params

if TYPE_CHECKING:  # the serial pieces are imported only by links that use them
    from vpnd_runtime.proto.slip import SlipFramer

#: Deadline for a TCP connect, and then for the handshake on it.
HANDSHAKE_TIMEOUT = 10.0
#: Handshake deadline on serial lines, where a lost handshake message is retried by starting over.
SERIAL_HANDSHAKE_TIMEOUT = 4.0
#: UDP: bytes of a PACKETS message around each packet (u32 length) and the message's own 2.
_PACKET_OVERHEAD = 4


def params_from_config(config: Config) -> Params:
    """The protocol core's parameters for this config (the same on both ends of a link).

    Over UDP a datagram carries at most one MTU-sized packet (with its virtio header and length)
    or a batch of small ones of no more bytes, so it fits the path MTU the `mtu` was chosen for.
    """
    common = {
        "cipher": config.cipher,
        "compress": config.compress,
        "compress_level": config.compress_level,
        "keepalive": config.keepalive,
        "noanswer": config.noanswer,
        "keyttl": config.keyttl,
        "maxdelay": config.maxdelay,
    }
    if config.transport == "udp" and not config.is_serial:
        return Params(
            **common,
            sendbuf=config.mtu + VNET_HDR_LEN + _PACKET_OVERHEAD,
            datagram=True,
            handshake_timeout=HANDSHAKE_TIMEOUT,
        )
    return Params(
        **common,
        sendbuf=config.sendbuf,
        lossy=config.is_serial,
        # A handshake message lost on a noisy line is only retried by starting over: keep that
        # wait short on serial links (a handshake is ~200 bytes: 20 ms at 115200 bit/s).
        handshake_timeout=SERIAL_HANDSHAKE_TIMEOUT if config.is_serial else HANDSHAKE_TIMEOUT,
    )


def load_table(config: Config) -> PeerTable:
    """The peers of `config` with their keys loaded (KeyFileError names a bad key file).

    A point-to-point link has one peer, the far end (named after the config); a hub has one per
    peer file, and a key file shared by several peer files is read once.
    """
    keys: dict[str, bytes] = {}
    owner = user_uid(config.user)

    def key_of(path: str) -> bytes:
        if path not in keys:
            keys[path] = load_key(path, owner)
        return keys[path]

    def next_of(path: str | None) -> dict[str, Any]:
        if path is None:
            return {}
        key = key_of(path)
        return {"next_key": key, "next_fingerprint": fingerprint(key)}

    if not config.is_hub:
        key = key_of(config.keyfile)
        name = os.path.basename(config.source).removesuffix(".conf") or "peer"
        peer = Peer(
            name=name,
            address=config.remote,
            address6=config.remote6,
            key=key,
            fingerprint=fingerprint(key),
            routes=config.routes,
            client_host=config.client_host,
            client_port=config.client_port,
            **next_of(config.nextkey),
        )
        return PeerTable([peer], hub=False)
    peers = []
    for spec in config.peers:
        key = key_of(spec.keyfile)
        peers.append(
            Peer(
                name=spec.name,
                address=spec.remote,
                address6=spec.remote6,
                key=key,
                fingerprint=fingerprint(key),
                **next_of(spec.nextkey),
                routes=spec.routes,
                client_host=(
                    spec.client_host if spec.client_host != "0.0.0.0" else config.client_host
                ),
                client_port=spec.client_port or config.client_port,
            )
        )
    return PeerTable(peers, hub=True)


@dataclass(eq=False)
class Session:
    """One carrier connection and the protocol state riding on it."""

    carrier: tcp.Carrier
    conn: Connection
    created: float
    peer: Peer | None = None  # known from the start when dialing; from the handshake on a server
    source: str = ""  # the carrier's source address (per-source caps)
    up: bool = False
    closed: bool = False
    framer: SlipFramer | None = None
    tx_registered: bool = field(default=False)
    blocked_since: float | None = None
    deadline: float | None = None  # the protocol deadline this session is filed under


def new_index(taken: Container[int]) -> int:
    """A random non-zero UDP session index (0 marks a message 1) that is not in `taken`."""
    while True:
        index = int.from_bytes(os.urandom(4), "big")
        if index and index not in taken:
            return index
