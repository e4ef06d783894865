"""SLIP framing: RFC 1055 byte values, xfilter escaping, resynchronisation after noise."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vpnd_runtime.proto.slip import END, ESC, XOFF, XON, SlipFramer

messages_st = st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=20)
# Payloads rich in the special bytes so escapes are exercised on every run.
special_st = st.binary(min_size=1, max_size=200).map(
    lambda b: bytes(b"\xc0\xdb\x11\x13\xdc\xdd\xde\xdf"[x % 8] if x < 128 else x for x in b)
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split `data` at the given (unsorted, possibly repeated) offsets."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return out


def decode_all(framer: SlipFramer, chunks: list[bytes]) -> list[bytes]:
    got: list[bytes] = []
    for chunk in chunks:
        got.extend(framer.decode(chunk))
    return got


def test_frames_use_rfc1055_byte_values_and_begin_and_end_with_end() -> None:
    framer = SlipFramer()
    assert framer.encode(b"A\xc0B\xdbC") == b"\xc0A\xdb\xdcB\xdb\xddC\xc0"


def test_xfilter_escapes_xon_and_xoff_as_esc_de_and_esc_df() -> None:
    assert SlipFramer(xfilter=True).encode(b"\x11\x13") == b"\xc0\xdb\xde\xdb\xdf\xc0"
    assert SlipFramer(xfilter=False).encode(b"\x11\x13") == b"\xc0\x11\x13\xc0"


def test_encoded_escape_bytes_round_trip_exactly() -> None:
    tricky = b"\xdb\xdc\xdb\xdd\xc0\xdc\xdb\xc0\xdb"
    framer = SlipFramer(xfilter=True)
    assert framer.decode(framer.encode(tricky)) == [tricky]


def test_empty_and_oversized_messages_are_refused_on_encode() -> None:
    framer = SlipFramer(max_message=10)
    with pytest.raises(ValueError, match="empty"):
        framer.encode(b"")
    with pytest.raises(ValueError, match="exceeds"):
        framer.encode(b"x" * 11)


def test_back_to_back_ends_are_skipped_without_counting() -> None:
    framer = SlipFramer()
    assert framer.decode(b"\xc0\xc0\xc0abc\xc0\xc0") == [b"abc"]
    assert sum(framer.errors.values()) == 0


def test_invalid_escape_drops_only_that_frame_and_is_counted() -> None:
    framer = SlipFramer()
    line = framer.encode(b"one") + b"\xc0x\xdbqy\xc0" + framer.encode(b"two")
    assert framer.decode(line) == [b"one", b"two"]
    assert framer.errors["bad_escape"] == 1


def test_escape_immediately_before_end_drops_the_frame() -> None:
    framer = SlipFramer()
    assert framer.decode(b"\xc0abc\xdb\xc0" + framer.encode(b"next")) == [b"next"]
    assert framer.errors["bad_escape"] == 1


def test_line_noise_before_a_frame_is_flushed_by_its_leading_end() -> None:
    framer = SlipFramer()
    assert framer.decode(b"\xdb\xff" + framer.encode(b"payload")) == [b"payload"]
    assert framer.errors["bad_escape"] == 1


def test_over_long_frame_is_discarded_up_to_the_next_end_and_counted() -> None:
    framer = SlipFramer(max_message=16)
    decoded = framer.decode(b"\xc0" + b"z" * 17 + b"\xc0" + framer.encode(b"fits"))
    assert decoded == [b"fits"]
    assert framer.errors["oversize"] == 1


def test_endless_frame_is_dropped_early_so_memory_stays_bounded() -> None:
    framer = SlipFramer(max_message=100)
    for _ in range(50):
        assert framer.decode(b"n" * 64) == []
        assert framer.pending() <= 2 * 100
    assert framer.errors["oversize"] == 1
    assert framer.decode(b"tail\xc0" + framer.encode(b"ok")) == [b"ok"]


def test_raw_flow_control_bytes_are_dropped_with_xfilter() -> None:
    framer = SlipFramer(xfilter=True)
    line = bytearray(framer.encode(b"\x11data\x13"))
    line[3:3] = b"\x13\x11"  # a modem injecting XOFF/XON mid-frame
    assert framer.decode(bytes(line)) == [b"\x11data\x13"]
    assert framer.errors["flow_control"] == 2


def test_receiver_without_xfilter_still_understands_xfilter_escapes() -> None:
    sender, receiver = SlipFramer(xfilter=True), SlipFramer(xfilter=False)
    assert receiver.decode(sender.encode(b"\x11\x13")) == [b"\x11\x13"]


@given(messages_st, st.lists(st.integers(min_value=0), max_size=30), st.booleans())
def test_any_chunking_yields_the_same_messages(
    msgs: list[bytes], cuts: list[int], xfilter: bool
) -> None:
    enc = SlipFramer(xfilter=xfilter)
    stream = b"".join(enc.encode(m) for m in msgs)
    assert decode_all(SlipFramer(xfilter=xfilter), chunked(stream, cuts)) == msgs


@given(st.lists(special_st, min_size=1, max_size=10), st.booleans())
def test_messages_full_of_special_bytes_round_trip(msgs: list[bytes], xfilter: bool) -> None:
    framer = SlipFramer(xfilter=xfilter)
    stream = b"".join(framer.encode(m) for m in msgs)
    one_byte_at_a_time = [stream[i : i + 1] for i in range(len(stream))]
    assert decode_all(SlipFramer(xfilter=xfilter), one_byte_at_a_time) == msgs
    assert SlipFramer(xfilter=xfilter).decode(stream) == msgs


@given(st.binary(min_size=1, max_size=2000))
def test_xfilter_output_never_contains_raw_xon_or_xoff(payload: bytes) -> None:
    encoded = SlipFramer(xfilter=True).encode(payload)
    assert XON not in encoded
    assert XOFF not in encoded
    assert END not in encoded[1:-1]


@given(
    messages_st,
    st.lists(st.binary(max_size=200), min_size=1, max_size=21),
    st.lists(st.integers(min_value=0), max_size=20),
    st.booleans(),
)
@settings(max_examples=200)
def test_noise_between_frames_never_raises_and_never_damages_real_frames(
    msgs: list[bytes], noise: list[bytes], cuts: list[int], xfilter: bool
) -> None:
    framer = SlipFramer(xfilter=xfilter, max_message=300)
    parts = [noise[0]]
    for i, m in enumerate(msgs):
        parts.append(framer.encode(m))
        parts.append(noise[(i + 1) % len(noise)])
    stream = b"".join(parts)
    rx = SlipFramer(xfilter=xfilter, max_message=300)
    got = decode_all(rx, chunked(stream, cuts))
    # Every real message arrives intact and in order; anything else came from noise only.
    it = iter(got)
    assert all(any(g == m for g in it) for m in msgs)
    junk = len(got) - len(msgs)
    noise_bytes = sum(len(n) for n in noise) * len(msgs)
    assert 0 <= junk <= noise_bytes
    assert all(len(g) <= 300 for g in got)


@given(st.binary(max_size=3000), st.lists(st.integers(min_value=0), max_size=30), st.booleans())
def test_pure_garbage_never_raises_and_yields_only_bounded_messages(
    garbage: bytes, cuts: list[int], xfilter: bool
) -> None:
    rx = SlipFramer(xfilter=xfilter, max_message=64)
    got = decode_all(rx, chunked(garbage, cuts))
    assert all(0 < len(g) <= 64 for g in got)
    if xfilter:
        # Raw flow-control bytes are never data with xfilter; only escapes can produce them.
        assert sum(g.count(XON) + g.count(XOFF) for g in got) <= garbage.count(ESC)


@given(st.binary(max_size=1500), st.lists(st.integers(min_value=0), max_size=30))
def test_error_counters_do_not_depend_on_chunking(garbage: bytes, cuts: list[int]) -> None:
    whole, pieces = SlipFramer(max_message=64), SlipFramer(max_message=64)
    assert whole.decode(garbage) == decode_all(pieces, chunked(garbage, cuts))
    assert whole.errors == pieces.errors


def test_a_frame_damaged_by_noise_loses_only_itself() -> None:
    framer = SlipFramer()
    msgs = [bytes([i]) * 50 for i in range(1, 6)]
    stream = bytearray(b"".join(framer.encode(m) for m in msgs))
    stream[60] = ESC  # inside the second frame: an invalid escape
    stream[61] = 0x41
    got = SlipFramer().decode(bytes(stream))
    assert got == [msgs[0], *msgs[2:]]


def test_default_cap_carries_the_largest_frame_the_connection_builds() -> None:
    from vpnd_runtime.proto.framing import MAX_MESSAGE

    framer = SlipFramer()
    biggest = bytes(range(256)) * (MAX_MESSAGE // 256) + b"\xc0" * (MAX_MESSAGE % 256)
    assert len(biggest) == MAX_MESSAGE
    assert framer.decode(framer.encode(biggest)) == [biggest]
