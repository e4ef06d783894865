"""The modemchat engine: parse a chat(8)-style script and run it over a serial port.

Theory of operation
-------------------
A chat script is a sequence of whitespace-separated tokens. Keywords change the state; every
other token is, alternately, a string to *expect* from the modem and a string to *send* to it:

    ABORT 'BUSY'           fail as soon as the modem says BUSY (any number of ABORT strings)
    TIMEOUT 30             seconds to wait for each following expect string (default 45;
                           fractions allowed)
    SAY 'dialling...\\n'   show a message to the operator (transcript / `vpnd -t` output)
    ''  ATZ                expect nothing, send ATZ<CR>
    OK  ATDT5551234        wait for OK, then dial
    CONNECT \\c            wait for CONNECT, send nothing (\\c: no trailing CR)

Tokens may be quoted with '...' or "..." (keywords are only recognised unquoted, so 'TIMEOUT'
is an ordinary expect string). Lines whose first token starts with # are comments. An expect
token may carry chat(8) sub-expects, ``expect-send-expect``: if the first string does not arrive
in time, the send string is sent and the next expect tried (``ogin:--ogin:`` sends a bare CR and
waits again); write ``\\-`` for a literal hyphen.

Escapes, in both quoted and unquoted text:
    \\r CR   \\n LF   \\t TAB   \\s space   \\b backspace   \\N NUL   \\\\ backslash
    \\' and \\" quotes   \\- hyphen   \\^ caret   \\ooo octal byte   ^X control character
    send only:  \\d  wait 1 s     \\p  wait 0.1 s     \\c  no trailing CR (last in the string)
A send string ends with CR unless it ends with \\c. Every parse error names file:line.

Running (``run_chat``): the runner keeps one input buffer. For each expect it reads from the
port with short read timeouts until the expect string or any ABORT string appears in the input
not yet consumed; whichever match ends first wins (an ABORT string wins a tie). Input up to and
including the match is consumed. Every wait is bounded by the current TIMEOUT, measured with the
injected ``clock``; the \\d and \\p pauses of the script keep reading input while they wait, so
nothing the modem says is lost and no wait is a bare sleep. The result carries a transcript
of every step for ``vpnd -t`` and for the log.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Protocol, Union

from vpnd_runtime.trusted import untrusted_reason

DEFAULT_TIMEOUT = 45.0  # chat(8)'s default, seconds per expect
_READ_SLICE = 0.1  # longest single blocking read, so deadlines are checked often
_WRITE_TIMEOUT = 5.0  # a send that the line does not take within this is a failure
_KEYWORDS = {"ABORT", "TIMEOUT", "SAY"}
_UNSUPPORTED = {"ECHO", "HANGUP", "REPORT", "CLR_ABORT", "CLR_REPORT", "EOT", "BREAK"}
_SIMPLE_ESCAPES = {
    "r": b"\r",
    "n": b"\n",
    "t": b"\t",
    "s": b" ",
    "b": b"\b",
    "N": b"\x00",
    "\\": b"\\",
    "'": b"'",
    '"': b'"',
    "-": b"-",
    "^": b"^",
}


class ChatScriptError(ValueError):
    """A chat script that cannot be parsed; ``str()`` is ``"{path}:{line}: {message}"``."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        self.path = path
        self.line = line
        self.message = message
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Delay:
    """A pause inside a send string (\\d = 1 s, \\p = 0.1 s)."""

    seconds: float


SendPart = Union[bytes, Delay]


@dataclass(frozen=True)
class Abort:
    """ABORT <text>: fail when `text` is received."""

    text: bytes
    line: int


@dataclass(frozen=True)
class SetTimeout:
    """TIMEOUT <seconds>: the wait for each following expect string."""

    seconds: float
    line: int


@dataclass(frozen=True)
class Say:
    """SAY <text>: a message for the operator."""

    text: str
    line: int


@dataclass(frozen=True)
class Send:
    """A string to send; `parts` are bytes and pauses, the trailing CR already included."""

    parts: tuple[SendPart, ...]
    line: int
    source: str


@dataclass(frozen=True)
class Expect:
    """A string to wait for; b"" waits for nothing. `fallbacks` are chat(8) sub-expects."""

    text: bytes
    line: int
    source: str
    fallbacks: tuple[tuple[Send, bytes], ...] = ()


Step = Union[Abort, SetTimeout, Say, Send, Expect]


@dataclass(frozen=True)
class ChatScript:
    """A parsed chat script: its file name (for messages) and its steps in order."""

    path: str
    steps: tuple[Step, ...]


@dataclass
class ChatResult:
    """How a chat went: `ok`, a one-line `reason`, and one transcript line per step."""

    ok: bool
    reason: str
    transcript: list[str] = field(default_factory=list)
    matched: str | None = None  # the last expect or ABORT string that matched
    received: bytes = b""  # everything read from the modem, for the log


class ChatPort(Protocol):
    """What the runner needs from a port: pyserial's Serial satisfies it."""

    timeout: float | None

    def read(self, size: int = 1) -> bytes: ...

    def write(self, data: bytes) -> int | None: ...


class ChatConfig(Protocol):
    """The Config fields ``run_chat_test`` uses (see docs/architecture.md §Config)."""

    server_host: str
    speed: int
    nortscts: bool
    localline: bool
    modemchat: str | None


# -- parsing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    raw: str  # quotes removed, backslash escapes still raw
    line: int
    quoted: bool


def _tokenize(text: str, path: str) -> list[_Token]:
    tokens: list[_Token] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        i, n = 0, len(line)
        first = True
        while i < n:
            if line[i].isspace():
                i += 1
                continue
            if line[i] == "#" and first:
                break  # a comment line (a '#' later on a line is an ordinary character)
            first = False
            raw: list[str] = []
            quoted = False
            while i < n and not line[i].isspace():
                ch = line[i]
                if ch in "'\"":
                    quoted = True
                    close = ch
                    i += 1
                    while True:
                        if i >= n:
                            raise ChatScriptError(path, lineno, f"unterminated {close} quote")
                        if line[i] == close:
                            i += 1
                            break
                        if line[i] == "\\" and i + 1 < n:
                            raw.append(line[i : i + 2])
                            i += 2
                            continue
                        raw.append(line[i])
                        i += 1
                elif ch == "\\":
                    if i + 1 >= n:
                        raise ChatScriptError(path, lineno, "backslash at the end of the line")
                    raw.append(line[i : i + 2])
                    i += 2
                else:
                    raw.append(ch)
                    i += 1
            tokens.append(_Token("".join(raw), lineno, quoted))
    return tokens


def _unescape(raw: str, path: str, line: int, sending: bool) -> tuple[list[SendPart], bool]:
    """Turn escapes into bytes and pauses; return (parts, no_cr) where no_cr is a final \\c."""
    parts: list[SendPart] = []
    buf = bytearray()
    no_cr = False
    i, n = 0, len(raw)
    role = "send" if sending else "expect"
    while i < n:
        ch = raw[i]
        if ch == "^" and i + 1 < n:
            ctl = raw[i + 1]
            if ctl == "?":
                buf.append(0x7F)
            elif "@" <= ctl.upper() <= "_":
                buf.append(ord(ctl.upper()) - 0x40)
            else:
                raise ChatScriptError(path, line, f"^{ctl} is not a control character")
            i += 2
            continue
        if ch != "\\":
            try:
                buf += ch.encode("latin-1")
            except UnicodeEncodeError:
                raise ChatScriptError(
                    path, line, f"{ch!r} is not a single byte (chat strings are bytes)"
                ) from None
            i += 1
            continue
        esc = raw[i + 1]  # the tokenizer guarantees a character after every backslash
        i += 2
        if esc in _SIMPLE_ESCAPES:
            buf += _SIMPLE_ESCAPES[esc]
        elif esc in "01234567":
            digits = esc
            while i < n and len(digits) < 3 and raw[i] in "01234567":
                digits += raw[i]
                i += 1
            value = int(digits, 8)
            if value > 0xFF:
                raise ChatScriptError(path, line, f"\\{digits} is not a byte")
            buf.append(value)
        elif esc in "dpc":
            if not sending:
                raise ChatScriptError(path, line, f"\\{esc} is only allowed in a send string")
            if esc == "c":
                if i != n:
                    raise ChatScriptError(path, line, "\\c must end the send string")
                no_cr = True
            else:
                if buf:
                    parts.append(bytes(buf))
                    buf.clear()
                parts.append(Delay(1.0 if esc == "d" else 0.1))
        else:
            raise ChatScriptError(path, line, f"unknown escape \\{esc} in {role} string")
    if buf:
        parts.append(bytes(buf))
    return parts, no_cr


def _split_subexpects(raw: str) -> list[str]:
    """Split an expect token on '-' that is not escaped (chat(8) expect-send-expect)."""
    pieces, cur, i = [], [], 0
    while i < len(raw):
        if raw[i] == "\\" and i + 1 < len(raw):
            cur.append(raw[i : i + 2])
            i += 2
        elif raw[i] == "-":
            pieces.append("".join(cur))
            cur = []
            i += 1
        else:
            cur.append(raw[i])
            i += 1
    pieces.append("".join(cur))
    return pieces


def _make_send(raw: str, path: str, line: int) -> Send:
    parts, no_cr = _unescape(raw, path, line, sending=True)
    if not no_cr:
        parts.append(b"\r")
    merged: list[SendPart] = []
    for part in parts:
        if isinstance(part, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += part
        else:
            merged.append(part)
    return Send(tuple(merged), line, raw)


def _expect_bytes(raw: str, path: str, line: int) -> bytes:
    parts, _ = _unescape(raw, path, line, sending=False)
    return b"".join(p for p in parts if isinstance(p, bytes))


def _make_expect(token: _Token, path: str) -> Expect:
    pieces = _split_subexpects(token.raw)
    if len(pieces) % 2 == 0:
        raise ChatScriptError(
            path, token.line, f"expect {token.raw!r} ends with a send: write expect-send-expect"
        )
    fallbacks = tuple(
        (
            _make_send(pieces[k], path, token.line),
            _expect_bytes(pieces[k + 1], path, token.line),
        )
        for k in range(1, len(pieces), 2)
    )
    return Expect(_expect_bytes(pieces[0], path, token.line), token.line, token.raw, fallbacks)


def parse_chat_script(text: str, path: str = "<string>") -> ChatScript:
    """Parse chat script `text`; ``ChatScriptError`` names `path`:line for every problem."""
    tokens = _tokenize(text, path)
    steps: list[Step] = []
    expecting = True
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        word = tok.raw
        if not tok.quoted and word in _UNSUPPORTED:
            raise ChatScriptError(path, tok.line, f"chat keyword {word} is not supported by vpnd")
        if not tok.quoted and word in _KEYWORDS:
            if i + 1 >= len(tokens):
                raise ChatScriptError(path, tok.line, f"{word} needs an argument")
            arg = tokens[i + 1]
            if word == "ABORT":
                text_bytes = _expect_bytes(arg.raw, path, arg.line)
                if not text_bytes:
                    raise ChatScriptError(path, arg.line, "ABORT needs a non-empty string")
                steps.append(Abort(text_bytes, arg.line))
            elif word == "TIMEOUT":
                try:
                    seconds = float(arg.raw)
                except ValueError:
                    raise ChatScriptError(
                        path, arg.line, f"TIMEOUT needs a number of seconds, not {arg.raw!r}"
                    ) from None
                if not 0 < seconds <= 3600:
                    raise ChatScriptError(
                        path, arg.line, f"TIMEOUT {arg.raw} is out of range (0 < s <= 3600)"
                    )
                steps.append(SetTimeout(seconds, arg.line))
            else:
                said = _expect_bytes(arg.raw, path, arg.line)
                steps.append(Say(said.decode("latin-1"), arg.line))
            i += 2
            continue
        if expecting:
            steps.append(_make_expect(tok, path))
        else:
            steps.append(_make_send(tok.raw, path, tok.line))
        expecting = not expecting
        i += 1
    if not any(isinstance(s, (Expect, Send)) for s in steps):
        raise ChatScriptError(path, None, "the chat script has no expect/send strings")
    return ChatScript(path, tuple(steps))


def load_chat_script(path: str) -> ChatScript:
    """Read and parse the chat script file at `path` (errors name the file and line)."""
    try:
        with open(path, encoding="utf-8") as fh:
            reason = untrusted_reason(os.fstat(fh.fileno()), path, "modemchat file")
            text = fh.read()
    except OSError as exc:
        raise ChatScriptError(path, None, f"cannot read chat script: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ChatScriptError(path, None, f"not UTF-8 text: {exc.reason}") from exc
    if reason is not None:  # the script drives the line the daemon trusts: owner-only writes
        raise ChatScriptError(path, None, reason)
    return parse_chat_script(text, path)


# -- running ---------------------------------------------------------------------------------


def show(data: bytes) -> str:
    """Render bytes in chat notation, quoted: CR as \\r, LF as \\n, other controls as ^X."""
    out = []
    for b in data:
        if b == 0x0D:
            out.append("\\r")
        elif b == 0x0A:
            out.append("\\n")
        elif b == 0x5C:
            out.append("\\\\")
        elif b == 0x27:
            out.append("\\'")
        elif b < 0x20:
            out.append("^" + chr(b + 0x40))
        elif b >= 0x7F:
            out.append(f"\\{b:03o}")
        else:
            out.append(chr(b))
    return "'" + "".join(out) + "'"


class _ChatFailed(Exception):
    def __init__(self, reason: str, matched: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.matched = matched


class _Runner:
    def __init__(
        self,
        script: ChatScript,
        port: ChatPort,
        clock: Callable[[], float],
        on_step: Callable[[str], None] | None,
    ) -> None:
        self.script = script
        self.port = port
        self.clock = clock
        self.on_step = on_step
        self.transcript: list[str] = []
        self.aborts: list[bytes] = []
        self.timeout = DEFAULT_TIMEOUT
        self.pending = bytearray()  # received, not yet consumed by a match
        self.received = bytearray()
        self.matched: str | None = None
        self.started = clock()

    def note(self, text: str) -> None:
        line = f"{self.clock() - self.started:7.2f}s  {text}"
        self.transcript.append(line)
        if self.on_step is not None:
            self.on_step(line)

    def read_some(self, deadline: float) -> None:
        """Read what arrives before `deadline` (at most one short blocking read)."""
        remaining = deadline - self.clock()
        if remaining <= 0:
            return
        self.port.timeout = min(remaining, _READ_SLICE)
        data = self.port.read(1)
        if data:
            waiting = getattr(self.port, "in_waiting", 0)
            if waiting:
                data += self.port.read(waiting)
            self.pending += data
            self.received += data

    def pause(self, seconds: float) -> None:
        """A \\d or \\p pause: keep reading input until the pause is over."""
        deadline = self.clock() + seconds
        while self.clock() < deadline:
            self.read_some(deadline)

    def write(self, data: bytes) -> None:
        deadline = self.clock() + _WRITE_TIMEOUT
        while data:
            written = self.port.write(data)
            n = len(data) if written is None else written
            data = data[n:]
            if data and self.clock() >= deadline:
                raise _ChatFailed(f"the line did not take {show(data)} within {_WRITE_TIMEOUT} s")

    def send(self, step: Send) -> None:
        shown = "".join(
            show(p)[1:-1] if isinstance(p, bytes) else ("\\d" if p.seconds >= 1 else "\\p")
            for p in step.parts
        )
        self.note(f"line {step.line}: send '{shown}'")
        for part in step.parts:
            if isinstance(part, Delay):
                self.pause(part.seconds)
            else:
                self.write(part)

    def expect(self, text: bytes, line: int) -> bool:
        """Wait for `text` or an ABORT string; True when `text` matched, False on timeout."""
        if not text:
            self.note(f"line {line}: expect nothing")
            return True
        self.note(f"line {line}: expect {show(text)} (timeout {self.timeout:g} s)")
        deadline = self.clock() + self.timeout
        while True:
            best: tuple[int, int, bytes] | None = None  # (end, is_expect, string)
            for candidate, is_expect in [*((a, 0) for a in self.aborts), (text, 1)]:
                at = self.pending.find(candidate)
                if at >= 0:
                    key = (at + len(candidate), is_expect, candidate)
                    if best is None or key < best:
                        best = key
            if best is not None:
                end, is_expect, found = best
                del self.pending[:end]
                self.matched = show(found)
                if not is_expect:
                    self.note(f"line {line}: aborted: modem said {show(found)}")
                    raise _ChatFailed(f"aborted: modem said {show(found)}", show(found))
                self.note(f"line {line}: got {show(found)}")
                return True
            if self.clock() >= deadline:
                return False
            self.read_some(deadline)

    def run(self) -> None:
        for step in self.script.steps:
            if isinstance(step, Abort):
                self.aborts.append(step.text)
                self.note(f"line {step.line}: ABORT on {show(step.text)}")
            elif isinstance(step, SetTimeout):
                self.timeout = step.seconds
                self.note(f"line {step.line}: TIMEOUT {step.seconds:g} s")
            elif isinstance(step, Say):
                self.note(f"line {step.line}: say {step.text.rstrip()}")
            elif isinstance(step, Send):
                self.send(step)
            else:
                self.run_expect(step)

    def run_expect(self, step: Expect) -> None:
        if self.expect(step.text, step.line):
            return
        last = step.text
        for fallback_send, fallback_expect in step.fallbacks:
            self.note(f"line {step.line}: no {show(last)} yet, trying the sub-expect")
            self.send(fallback_send)
            if self.expect(fallback_expect, step.line):
                return
            last = fallback_expect
        heard = bytes(self.pending[-80:])
        tail = f"; last heard {show(heard)}" if heard else "; heard nothing"
        reason = (
            f"{self.script.path}:{step.line}: timeout after {self.timeout:g} s "
            f"waiting for {show(last)}{tail}"
        )
        self.note(f"line {step.line}: timeout waiting for {show(last)}")
        raise _ChatFailed(reason)


def run_chat(
    script: ChatScript,
    port: ChatPort,
    *,
    clock: Callable[[], float] = time.monotonic,
    on_step: Callable[[str], None] | None = None,
) -> ChatResult:
    """Run `script` over `port` (anything with read/write/timeout, e.g. pyserial Serial).

    Every wait is bounded by the script's TIMEOUT measured on `clock`; `on_step` receives each
    transcript line as it happens (for live output). The port's read timeout (and, when it has
    one, its write timeout) is restored afterwards. Never raises for modem behaviour: BUSY,
    silence and a dead line come back as ``ok=False`` with the reason.
    """
    runner = _Runner(script, port, clock, on_step)
    saved_timeout = port.timeout
    saved_write_timeout = getattr(port, "write_timeout", None)
    if hasattr(port, "write_timeout"):
        port.write_timeout = _WRITE_TIMEOUT
    try:
        runner.run()
    except _ChatFailed as failed:
        return ChatResult(
            False,
            failed.reason,
            runner.transcript,
            failed.matched or runner.matched,
            bytes(runner.received),
        )
    except OSError as exc:  # pyserial's SerialException is an OSError
        runner.note(f"line error: {exc}")
        return ChatResult(
            False, f"serial line error: {exc}", runner.transcript, None, bytes(runner.received)
        )
    finally:
        port.timeout = saved_timeout
        if hasattr(port, "write_timeout"):
            port.write_timeout = saved_write_timeout
    return ChatResult(
        True, "chat completed", runner.transcript, runner.matched, bytes(runner.received)
    )


def run_chat_test(config: ChatConfig, out: IO[str] | None = None) -> int:
    """``vpnd -t -f CONF``: open the configured line, run `modemchat`, print each step; 0/1.

    Uses ``server_host`` (the device), ``speed``, RTS/CTS unless ``nortscts`` and ``localline``.
    After a successful chat it reports the carrier (DCD) state when the device has modem lines.
    """
    from vpnd_runtime.io.serial import carrier_ok, modem_lines, open_serial  # noqa: PLC0415

    stream = sys.stdout if out is None else out

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    if not config.modemchat:
        say("chat test: the configuration has no modemchat script")
        return 1
    try:
        script = load_chat_script(config.modemchat)
    except ChatScriptError as exc:
        say(f"chat test: {exc}")
        return 1
    rtscts = not config.nortscts
    say(
        f"chat test: {config.server_host} at {config.speed} bps, "
        f"{'RTS/CTS' if rtscts else 'no'} flow control, "
        f"{'local line' if config.localline else 'modem control lines'}, script {script.path}"
    )
    try:
        port = open_serial(config.server_host, config.speed, rtscts, config.localline)
    except OSError as exc:
        say(f"chat test: {exc}")
        return 1
    try:
        result = run_chat(script, port, on_step=say)
        if not result.ok:
            say(f"chat test FAILED: {result.reason}")
            return 1
        if config.localline:
            carrier = "ignored (localline)"
        elif modem_lines(port.fileno()) is None:
            carrier = "unknown (device has no modem lines)"
        else:
            carrier = "up" if carrier_ok(port, False) else "DOWN"
        say(f"chat test OK: last match {result.matched or 'none'}; carrier {carrier}")
        return 0
    finally:
        port.close()
