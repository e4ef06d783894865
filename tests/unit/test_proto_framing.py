"""The u32 length framer: chunking, caps checked before allocation, zero length."""

from __future__ import annotations

import tracemalloc

import pytest

from vpnd_runtime.proto import LengthFramer, RemoteProtocolError, encode_frame


def test_messages_come_back_whole_whatever_the_chunking() -> None:
    msgs = [b"a", b"hello" * 100, bytes(range(256)) * 3]
    stream = b"".join(LengthFramer.encode(m) for m in msgs)
    for size in (1, 2, 3, 4, 5, 7, 64, len(stream)):
        f = LengthFramer()
        got: list[bytes] = []
        for pos in range(0, len(stream), size):
            got += f.decode(stream[pos : pos + size])
        assert got == msgs, size
        assert f.buffered == 0


def test_a_half_read_header_is_kept_not_lost() -> None:
    f = LengthFramer()
    frame = encode_frame(b"xyz")
    assert f.decode(frame[:2]) == []
    assert f.buffered == 2
    assert f.decode(frame[2:]) == [b"xyz"]


def test_oversized_length_is_rejected_from_the_header_alone_without_allocating() -> None:
    f = LengthFramer()
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError, match="exceeds the cap"):
            f.decode(b"\xff\xff\xff\xff")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_length_just_above_the_cap_is_rejected_and_the_cap_itself_accepted() -> None:
    f = LengthFramer(max_message=10)
    assert f.decode(encode_frame(b"0123456789")) == [b"0123456789"]
    with pytest.raises(RemoteProtocolError, match="11 exceeds"):
        LengthFramer(max_message=10).decode(encode_frame(b"0123456789a"))


def test_zero_length_frame_is_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="length 0"):
        LengthFramer().decode(b"\0\0\0\0")


def test_encoding_an_empty_message_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot be framed"):
        LengthFramer.encode(b"")


def test_zero_copy_decoding_gives_the_same_messages_as_decode() -> None:
    msgs = [b"a", b"b" * 1000, b"c" * 3]
    stream = b"".join(LengthFramer.encode(m) for m in msgs)
    for size in (1, 3, 5, 1004, len(stream)):
        f = LengthFramer()
        got: list[bytes] = []
        for pos in range(0, len(stream), size):
            got += [bytes(m) for m in f.decode_views(stream[pos : pos + size])]
        assert got == msgs, size


def test_zero_copy_decoding_checks_the_cap_too() -> None:
    with pytest.raises(RemoteProtocolError, match="exceeds the cap"):
        LengthFramer(max_message=8).decode_views(b"\0\0\0\x09" + bytes(9))
    with pytest.raises(RemoteProtocolError, match="length 0"):
        LengthFramer().decode_views(b"\0\0\0\0")


def test_a_lowered_cap_is_named_in_the_error_with_its_note() -> None:
    f = LengthFramer()
    f.set_cap(1024, "before the handshake completes")
    with pytest.raises(
        RemoteProtocolError, match="1025 exceeds the cap of 1024 bytes before the handshake"
    ):
        f.decode(encode_frame(bytes(1025)))


def test_decoding_with_a_limit_keeps_the_rest_for_the_cap_in_force_later() -> None:
    stream = encode_frame(b"small") + encode_frame(bytes(5000))
    f = LengthFramer()
    f.set_cap(1024)
    assert f.decode(stream, 1) == [b"small"]  # the big frame behind it is not looked at yet
    f.set_cap(8192)
    assert f.decode(b"") == [bytes(5000)]
    assert f.buffered == 0
