"""The daemon's memory diet (issue 15) must not change behaviour: `vpnd -f CONF` is parsed
without argparse exactly as argparse parses it, X25519 through the Rust binding is the same
function as cryptography's public API, and a deferred standard module (vpnd_runtime.lazyimport)
works as the real one from its first use, in any thread."""

from __future__ import annotations

import os
import subprocess
import sys

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


DEFERRED_USE = r"""
import sys, threading
import vpnd_runtime
assert type(sys.modules["inspect"]).__name__ == "_Deferred", sys.modules["inspect"]
import dataclasses, logging
from dataclasses import dataclass

@dataclass
class NoDoc:
    a: int

assert NoDoc.__doc__ == "NoDoc(a: int)", NoDoc.__doc__
import inspect
from inspect import signature
assert str(signature(NoDoc)) == "(a: int) -> None"
assert inspect.isclass(NoDoc) and sys.modules["inspect"].signature is signature

# traceback: first used by two threads at once, both get the real module
import traceback
out = []
def fmt():
    try:
        raise ValueError("x")
    except ValueError:
        out.append(traceback.format_exc())
threads = [threading.Thread(target=fmt) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
assert len(out) == 4 and all("ValueError: x" in o for o in out), out
logging.basicConfig()
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("t").exception("boom")
import array, socket
assert array.array("i", [1, 2]).tolist() == [1, 2]
print("ok")
"""


def test_deferred_modules_work_as_the_real_ones_on_first_use():
    proc = subprocess.run(
        [sys.executable, "-c", DEFERRED_USE],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert "ZeroDivisionError: division by zero" in proc.stderr  # logging printed the traceback


def test_release_startup_memory_is_safe_to_call():
    from vpnd_runtime.process import release_startup_memory

    release_startup_memory()
    release_startup_memory()
