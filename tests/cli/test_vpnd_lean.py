"""The daemon's memory diet (issue 15) must not change behaviour: `vpnd -f CONF` is parsed
without argparse exactly as argparse parses it, and X25519 through the Rust binding is the
same function as cryptography's public API."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from vpnd_runtime import cli
from vpnd_runtime.proto import handshake
from vpnd_runtime.proto.errors import RemoteProtocolError

RUN_LINES = [
    [],
    ["-f", "l1.conf"],
    ["--config", "l1.conf", "-v", "--daemon"],
    ["-f", "a.conf", "-f", "b.conf"],
    ["-v", "-f", "x.conf", "--verbose"],
    ["--daemon"],
    ["-f", "status"],
]


@pytest.mark.parametrize("argv", RUN_LINES, ids=" ".join)
def test_the_daemons_command_lines_parse_as_argparse_parses_them(argv):
    expected = cli._top_parser().parse_args(argv)
    expected.command = "run"
    fast = cli._parse_run(argv)
    assert fast is not None
    assert vars(fast) == vars(expected)
    assert vars(cli._parse(argv)) == vars(expected)


@pytest.mark.parametrize(
    "argv",
    [
        ["-fl1.conf"],
        ["--config=l1.conf"],
        ["-f"],
        ["-f", "-v"],
        ["--conf", "l1.conf"],
        ["-vf", "l1.conf"],
        ["--check", "-f", "l1.conf"],
        ["status", "-f", "l1.conf"],
        ["-h"],
        ["--bogus"],
    ],
    ids=" ".join,
)
def test_every_other_spelling_is_left_to_argparse(argv):
    assert cli._parse_run(argv) is None


def test_usage_errors_are_still_argparses(capsys):
    assert cli.main(["-f"]) == 2
    assert "expected one argument" in capsys.readouterr().err


def test_x25519_through_the_binding_matches_the_public_api():
    seed = os.urandom(32)
    mine, mine_pub = handshake.generate_keypair(lambda n: seed)
    theirs = X25519PrivateKey.generate()
    public = X25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    assert mine_pub == public
    peer_pub = theirs.public_key().public_bytes_raw()
    assert handshake.dh(mine, peer_pub) == theirs.exchange(
        X25519PublicKey.from_public_bytes(public)
    )


def test_a_low_order_peer_key_is_still_the_peers_fault():
    mine, _ = handshake.generate_keypair(os.urandom)
    with pytest.raises(RemoteProtocolError):
        handshake.dh(mine, bytes(32))
