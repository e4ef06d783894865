"""The documented contract of every part that takes bytes from the network or files from users.

One function per fuzz target, `check_<target>(data: bytes) -> None`: it feeds `data` to the part
under test and raises AssertionError when the part breaks its contract (an exception other than
the documented one escapes, or a documented invariant fails).  The atheris harness
(`python -m fuzz TARGET`) calls these with coverage-guided inputs; the regression tests in
tests/unit/test_fuzz_regressions.py call them on every crash ever found (fuzz/regressions/), so
this module must not need atheris.

Per-exec work is kept small: no files, no sockets, a fixed fake clock and fixed keys.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

from vpnctl.deploy import DeployError, parse_probe, parse_status_output, parse_target
from vpnctl.fleetstatus import (
    FleetStatus,
    MalformedAnswer,
    _judge,
    format_table,
    parse_host_output,
)
from vpnctl.inventory import InventoryError, parse_inventory
from vpnd_runtime.config import ConfigError, parse_config
from vpnd_runtime.proto import Connection, Packets, Params, RemoteProtocolError, State
from vpnd_runtime.proto.connection import Stats
from vpnd_runtime.proto.events import LinkUp
from vpnd_runtime.proto.framing import LengthFramer
from vpnd_runtime.proto.handshake import PROLOGUE, ReplayGuard, SessionKeys, _SymmetricState
from vpnd_runtime.proto.kdf import key_id
from vpnd_runtime.proto.session import RecvState, SendState, make_aead
from vpnd_runtime.proto.slip import SlipFramer

PSK = bytes(range(32))
WALL = 1_780_000_000.0
_K_I2R = bytes([0x11]) * 32
_K_R2I = bytes([0x22]) * 32
_CK = bytes([0x33]) * 32
_U16 = struct.Struct(">H")
#: Params are immutable: build the four variants once, not per execution.
_PARAMS = {
    (lossy, compress): Params(lossy=lossy, compress=compress)
    for lossy in (False, True)
    for compress in (False, True)
}


def _rng(n: int) -> bytes:
    """Fixed 'randomness': the harness must be deterministic so that a crash reproduces."""
    return bytes([0x42]) * n


# ------------------------------------------------------------------------ frames + session open
def _build_established(initiator: bool, lossy: bool, compress: bool, slip: bool) -> Connection:
    """A Connection past the handshake with fixed keys (no DH)."""
    role = "initiator" if initiator else "responder"
    params = _PARAMS[lossy, compress]
    framer = SlipFramer(max_message=4096) if slip else LengthFramer()
    conn = Connection(role, PSK, params, _rng, 0.0, framer=framer, wall=WALL)  # type: ignore[arg-type]
    send, recv = (_K_I2R, _K_R2I) if initiator else (_K_R2I, _K_I2R)
    conn._install_keys(SessionKeys(send, recv, _CK, bytes(32)), 0.0)
    conn._link_up(0.0, [])
    return conn


#: One established Connection per mode, built once; each execution gets a fresh copy of it whose
#: mutable state is new (`_established`), which costs a fraction of building one.
_TEMPLATES = {
    (i, lossy, c, slip): _build_established(i, lossy, c, slip)
    for i in (False, True)
    for lossy in (False, True)
    for c in (False, True)
    for slip in (False, True)
}
#: The attributes of an established Connection that change while it runs: `_established` makes
#: them new for every copy.  Any other attribute must hold an immutable value (checked below, so a
#: new mutable attribute in Connection stops the harness instead of leaking state between runs).
_RESET = {"stats", "_out", "_send", "_recv", "_framer", "_guard", "_next_send"}
_IMMUTABLE = (int, float, str, bytes, bool, type(None), tuple, Params, State)
for _t in _TEMPLATES.values():
    _mutable = {
        k
        for k, v in vars(_t).items()
        if not isinstance(v, _IMMUTABLE) and not callable(v) and k not in _RESET
    }
    if _mutable:
        raise RuntimeError(f"fuzz harness: Connection has new mutable state {sorted(_mutable)}")


def _established(initiator: bool, lossy: bool, compress: bool, slip: bool) -> Connection:
    """A fresh copy of the established template of this mode."""
    t = _TEMPLATES[initiator, lossy, compress, slip]
    conn = object.__new__(Connection)
    conn.__dict__.update(t.__dict__)
    conn.stats = Stats(established_at=0.0)
    conn._out = []
    conn._send = SendState(t._send.aead, 0, 0.0)  # type: ignore[union-attr]
    conn._recv = {0: RecvState(t._recv[0].aead, 0, 0.0)}
    conn._framer = SlipFramer(max_message=4096) if slip else LengthFramer()
    conn._guard = ReplayGuard()
    conn._next_send = None
    return conn


def _split_records(data: bytes) -> list[bytes]:
    """`data` as u16-length-prefixed records (the last one takes what is left)."""
    out: list[bytes] = []
    pos = 0
    while pos < len(data) and len(out) < 8:
        if len(data) - pos < 2:
            out.append(data[pos:])
            break
        (n,) = _U16.unpack_from(data, pos)
        out.append(data[pos + 2 : pos + 2 + n])
        pos += 2 + n
    return out


def check_frames(data: bytes) -> None:
    """The u32 length-frame decoder, then a keyed session opening what it decodes.

    Contract: bytes from the peer raise RemoteProtocolError or nothing; any chunking of the same
    stream gives the same frames; a Packets event comes only from a frame sealed with the session
    key (raw bytes can never produce one).  Byte 0 picks the mode: bit 0 role, bit 1 lossy,
    bit 2 compress, bit 3 'sealed' (the rest is u16-prefixed inner messages the harness seals with
    the peer's key, so the fuzzer reaches the inner message parsers past the AEAD), bit 4 SLIP.
    """
    if not data:
        return
    mode, body = data[0], data[1:]
    initiator, lossy, compress = bool(mode & 1), bool(mode & 2), bool(mode & 4)
    sealed, slip = bool(mode & 8), bool(mode & 16)
    if not sealed and not slip:
        _check_length_framer(body)
    conn = _established(initiator, lossy, compress, slip)
    framer = conn._framer
    if sealed:
        peer_key = _K_R2I if initiator else _K_I2R
        sender = SendState(make_aead(conn.params.cipher, peer_key), 0, 0.0)
        wire = b"".join(
            framer.encode(sender.seal(inner))  # type: ignore[attr-defined]
            for inner in _split_records(body)
            if inner
        )
    else:
        wire = body
    try:
        events = conn.receive_data(wire, 0.5)
    except RemoteProtocolError:
        assert conn.state is State.ERROR
        return
    if not sealed:
        assert not any(isinstance(e, Packets) for e in events), "unauthenticated Packets event"
    conn.data_to_send()


def _check_length_framer(stream: bytes) -> None:
    """Whole stream vs. the same stream cut in two: the same frames, or the same error."""
    cut = stream[0] % (len(stream) + 1) if stream else 0
    results = []
    for chunks in ([stream], [stream[:cut], stream[cut:]]):
        framer = LengthFramer(max_message=1024)
        frames: list[bytes] = []
        try:
            for chunk in chunks:
                frames += framer.decode(chunk)
            results.append((frames, framer.buffered, None))
        except RemoteProtocolError as exc:
            results.append((None, None, exc.reason))
    (f1, b1, e1), (f2, b2, e2) = results
    if e1 is None and e2 is None:
        assert f1 == f2 and b1 == b2, "chunking changed the decoded frames"
    else:
        # An error may come earlier in the stream than a partial frame would show; both see it.
        assert e1 is not None and e2 is not None, "chunking changed whether the stream is refused"


# ------------------------------------------------------------------------ handshake responder
def _message1(e_pub: bytes, payload: bytes) -> bytes:
    """Message 1 as an initiator holding the psk would build it around a chosen key/payload."""
    ss = _SymmetricState()
    ss.mix_hash(PROLOGUE)
    ss.mix_key_and_hash(PSK)
    ss.mix_hash(e_pub)
    ss.mix_key(e_pub)
    return b"\x01" + key_id(PSK) + e_pub + ss.encrypt_and_hash(payload)


def check_handshake(data: bytes) -> None:
    """The handshake: the responder reading message 1, the initiator reading message 2.

    Contract: only RemoteProtocolError escapes, and no LinkUp without a CONFIRM sealed with the
    session keys (which the fuzzer cannot produce).  Byte 0: bit 0 initiator side (the rest is
    fed as the responder's answer), bit 1 'forged' (responder side: the rest is e[32] | payload,
    sealed by the harness with the psk so the checks behind the AEAD are reached), bit 2 lossy.
    """
    if not data:
        return
    mode, body = data[0], data[1:]
    lossy = bool(mode & 4)
    params = Params(lossy=lossy, compress=bool(mode & 8))
    if mode & 1:
        conn = Connection("initiator", PSK, params, _rng, 0.0, wall=WALL)
        conn.start(0.0)
        conn.data_to_send()
        wire = body
    else:
        conn = Connection("responder", PSK, params, _rng, 0.0, wall=WALL)
        if mode & 2:
            e_pub = body[:32].ljust(32, b"\0")
            msg = _message1(e_pub, body[32:])
            wire = struct.pack(">I", len(msg)) + msg
        else:
            wire = body
    try:
        events = conn.receive_data(wire, 0.5)
    except RemoteProtocolError:
        assert conn.state is State.ERROR
        return
    assert not any(isinstance(e, LinkUp) for e in events), "LinkUp without the session keys"
    conn.data_to_send()


# ------------------------------------------------------------------------ SLIP
def check_slip(data: bytes) -> None:
    """SLIP decoding never raises; messages are non-empty and within max_message; any chunking
    gives the same messages and counters; encode/decode round-trips any message."""
    if not data:
        return
    xfilter = bool(data[0] & 1)
    cap = 1 + data[0] * 4
    stream = data[1:]
    cut = (stream[0] if stream else 0) % (len(stream) + 1)
    one, two = SlipFramer(xfilter, cap), SlipFramer(xfilter, cap)
    got1 = one.decode(stream)
    got2 = two.decode(stream[:cut]) + two.decode(stream[cut:])
    assert got1 == got2, "chunking changed the decoded messages"
    assert one.errors == two.errors, "chunking changed the error counters"
    assert all(0 < len(m) <= cap for m in got1), "empty or over-long message"
    if stream and len(stream) <= cap:
        fresh = SlipFramer(xfilter, cap)
        assert fresh.decode(fresh.encode(stream)) == [stream], "round trip failed"


# ------------------------------------------------------------------------ directive parser
def check_config(data: bytes) -> None:
    """parse_config raises ConfigError only; a Config it returns re-parses from its to_text()."""
    text = data.decode("utf-8", "replace")
    try:
        config = parse_config(text, "fuzz.conf")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.conf"), "a ConfigError that does not name the file"
        return
    again = parse_config(config.to_text(), "fuzz.conf")
    assert again == config, "to_text() does not re-parse to the same Config"


# ------------------------------------------------------------------------ inventory loader
def check_inventory(data: bytes) -> None:
    """parse_inventory raises InventoryError only (every problem named with the file)."""
    text = data.decode("utf-8", "replace")
    try:
        parse_inventory(text, "fuzz.yaml")
    except InventoryError as exc:
        assert str(exc).startswith("fuzz.yaml"), "an InventoryError that does not name the file"


# ------------------------------------------------------------------------ status and probe
_MANIFEST = {
    "links": {
        "alpha": {"role": "server", "peer": "h2"},
        "beta": {"role": "client", "peer": "h3"},
    }
}


def check_status(data: bytes) -> None:
    """A host's status output (vpnctl status): parsed and shown whatever the host printed.

    Contract: parse_host_output raises nothing but MalformedAnswer (which `vpnctl status` shows
    as that host's BAD ANSWER line), and the table and the JSON document of the result can
    always be produced (a garbled or hostile host cannot crash `vpnctl status`).
    """
    text = data.decode("utf-8", "replace")
    try:
        ends = parse_host_output("h1", _MANIFEST, text)
    except MalformedAnswer:
        return
    status = FleetStatus([_judge(e.link, [e]) for e in ends], {})
    format_table(status)
    json.dumps(status.to_json(), allow_nan=False)


def check_probe(data: bytes) -> None:
    """The deploy probe's output and its target line: parsed whatever the host printed.

    Contract: parse_probe raises nothing but DeployError (a malformed answer, e.g. a damaged
    deployed manifest, is that host's failure in deploy's recap)."""
    text = data.decode("utf-8", "replace")
    try:
        state = parse_probe(text, ["/etc/vpnd/a.conf", "/etc/vpnd/a.key"])
    except DeployError:
        state = None
    if state is not None:
        assert set(state.files) == {"/etc/vpnd/a.conf", "/etc/vpnd/a.key"}
    parse_status_output(text)
    for line in text.splitlines()[:4]:
        parse_target(line)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "frames": check_frames,
    "handshake": check_handshake,
    "slip": check_slip,
    "config": check_config,
    "inventory": check_inventory,
    "status": check_status,
    "probe": check_probe,
}
