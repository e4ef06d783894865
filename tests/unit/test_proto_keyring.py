"""A hub's responder: the key id selects the key, the announced address selects the client."""

from __future__ import annotations

import ipaddress
import os

import pytest

from vpnd_runtime.proto.connection import Connection, Params
from vpnd_runtime.proto.errors import RemoteProtocolError
from vpnd_runtime.proto.events import LinkUp
from vpnd_runtime.proto.handshake import ReplayGuard
from vpnd_runtime.proto.kdf import key_id

A = ipaddress.ip_address("198.19.1.2")
B = ipaddress.ip_address("198.19.1.3")


class Ring:
    """Clients: (psk, address) -> name."""

    def __init__(self, clients: dict[tuple[bytes, object], str]) -> None:
        self.clients = clients
        self.lookups = 0

    def keys_for(self, kid: bytes) -> list[bytes]:
        self.lookups += 1
        return list(dict.fromkeys(psk for psk, _ in self.clients if key_id(psk) == kid))

    def admit(self, psk: bytes, address: object) -> str | None:
        if address is None:
            names = [n for (p, _), n in self.clients.items() if p == psk]
            return names[0] if len(names) == 1 else None
        return self.clients.get((psk, address))


def handshake(psk: bytes, ring: Ring, announce: object, guard: ReplayGuard, wall: float = 1e9):
    """Run a full handshake; return the responder connection."""
    params = Params()
    init = Connection("initiator", psk, params, os.urandom, 0.0, wall=wall, announce=announce)
    resp = Connection(
        "responder", None, params, os.urandom, 0.0, keyring=ring, replay_guard=guard, wall=wall
    )
    init.start(0.0)
    resp.receive_data(init.data_to_send(), 0.0)
    events = init.receive_data(resp.data_to_send(), 0.0)
    assert any(isinstance(e, LinkUp) for e in events)
    events = resp.receive_data(init.data_to_send(), 0.0)
    assert any(isinstance(e, LinkUp) for e in events)
    return resp


def test_own_keys_select_the_client() -> None:
    ka, kb = os.urandom(32), os.urandom(32)
    ring = Ring({(ka, A): "alpha", (kb, B): "beta"})
    guard = ReplayGuard()
    assert handshake(kb, ring, B, guard).peer == "beta"
    resp = handshake(ka, ring, A, guard)
    assert resp.peer == "alpha"
    assert resp.peer_address == A
    assert resp.authenticated


def test_shared_key_clients_told_apart_by_address_and_both_pass_the_replay_guard() -> None:
    shared = os.urandom(32)
    ring = Ring({(shared, A): "alpha", (shared, B): "beta"})
    guard = ReplayGuard()
    # The same timestamp from two clients of one key: distinct guard entries, both accepted.
    assert handshake(shared, ring, A, guard, wall=1e9).peer == "alpha"
    assert handshake(shared, ring, B, guard, wall=1e9).peer == "beta"


def test_wrong_address_for_the_key_is_refused() -> None:
    ka = os.urandom(32)
    ring = Ring({(ka, A): "alpha"})
    init = Connection("initiator", ka, Params(), os.urandom, 0.0, wall=1e9, announce=B)
    resp = Connection("responder", None, Params(), os.urandom, 0.0, keyring=ring, wall=1e9)
    init.start(0.0)
    with pytest.raises(RemoteProtocolError, match=r"198\.19\.1\.3"):
        resp.receive_data(init.data_to_send(), 0.0)
    assert resp.data_to_send() == b""  # nothing answered


def test_unknown_key_is_refused_before_any_cryptography() -> None:
    ring = Ring({(os.urandom(32), A): "alpha"})
    init = Connection("initiator", os.urandom(32), Params(), os.urandom, 0.0, wall=1e9, announce=A)
    resp = Connection("responder", None, Params(), os.urandom, 0.0, keyring=ring, wall=1e9)
    init.start(0.0)
    with pytest.raises(RemoteProtocolError, match="no client uses this key"):
        resp.receive_data(init.data_to_send(), 0.0)
    assert resp.data_to_send() == b""
    assert ring.lookups == 1


def test_a_client_without_an_address_is_admitted_only_when_its_key_is_unambiguous() -> None:
    ka, shared = os.urandom(32), os.urandom(32)
    ring = Ring(
        {
            (ka, A): "alpha",
            (shared, B): "beta",
            (shared, ipaddress.ip_address("198.19.1.4")): "gamma",
        }
    )
    assert handshake(ka, ring, None, ReplayGuard()).peer == "alpha"
    init = Connection("initiator", shared, Params(), os.urandom, 0.0, wall=1e9)
    resp = Connection("responder", None, Params(), os.urandom, 0.0, keyring=ring, wall=1e9)
    init.start(0.0)
    with pytest.raises(RemoteProtocolError, match="no address"):
        resp.receive_data(init.data_to_send(), 0.0)


def test_single_key_responder_still_accepts_the_first_versions_message_1() -> None:
    """A client of the first version (10-byte payload) still reaches a single-link server."""
    from vpnd_runtime.proto.handshake import InitPayload

    psk = os.urandom(32)
    init = Connection("initiator", psk, Params(), os.urandom, 0.0, wall=1e9, announce=A)
    legacy = InitPayload(10**18, 1, 0).encode()[:10]
    assert len(legacy) == 10
    assert InitPayload.decode(legacy).announced is None
    init.start(0.0)
    msg = init.data_to_send()
    assert len(msg) == 4 + 79  # length prefix + message 1 with the address
