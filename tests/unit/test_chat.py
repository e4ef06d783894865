"""The modemchat engine: script parsing, and runs against a simulated modem over a PTY pair."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tests.conftest import require_tools
from tests.helpers.modem_sim import modem_sim
from tests.helpers.pty import pty_pair
from vpnd_runtime.config import parse_config
from vpnd_runtime.io.chat import (
    Abort,
    ChatScriptError,
    Delay,
    Expect,
    Say,
    Send,
    SetTimeout,
    load_chat_script,
    parse_chat_script,
    run_chat,
    run_chat_test,
)
from vpnd_runtime.io.serial import open_serial

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "modem.chat"

DIAL_SCRIPT = """\
# dial the far site
ABORT 'BUSY'
ABORT 'NO CARRIER'
TIMEOUT 2
''      ATZ
OK      ATDT5551234
CONNECT \\c
"""


# -- parsing ---------------------------------------------------------------------------------


def test_script_parses_into_abort_timeout_and_alternating_expect_send_steps() -> None:
    script = parse_chat_script(DIAL_SCRIPT, "dial.chat")
    assert script.steps == (
        Abort(b"BUSY", 2),
        Abort(b"NO CARRIER", 3),
        SetTimeout(2.0, 4),
        Expect(b"", 5, ""),
        Send((b"ATZ\r",), 5, "ATZ"),
        Expect(b"OK", 6, "OK"),
        Send((b"ATDT5551234\r",), 6, "ATDT5551234"),
        Expect(b"CONNECT", 7, "CONNECT"),
        Send((), 7, "\\c"),
    )


def test_escapes_become_bytes_and_pauses_in_send_strings() -> None:
    script = parse_chat_script("'' 'AT\\d\\pX\\s\\t\\N\\\\^C\\101'")
    send = script.steps[1]
    assert isinstance(send, Send)
    assert send.parts == (b"AT", Delay(1.0), Delay(0.1), b"X \t\x00\\\x03A\r")


def test_backslash_c_suppresses_the_trailing_carriage_return() -> None:
    send = parse_chat_script("'' 'ATH0\\c'").steps[1]
    assert isinstance(send, Send)
    assert send.parts == (b"ATH0",)


def test_double_quotes_and_escaped_quotes_are_understood() -> None:
    steps = parse_chat_script("\"it's\" 'say \\'hi\\''").steps
    assert steps[0] == Expect(b"it's", 1, "it's")
    assert isinstance(steps[1], Send)
    assert steps[1].parts == (b"say 'hi'\r",)


def test_quoted_keyword_is_an_ordinary_expect_string() -> None:
    steps = parse_chat_script("'TIMEOUT' x").steps
    assert steps[0] == Expect(b"TIMEOUT", 1, "TIMEOUT")


def test_sub_expect_sends_on_timeout_and_escaped_hyphen_is_literal() -> None:
    exp = parse_chat_script("ogin:--ogin: user NO\\-DIAL x").steps[0]
    assert isinstance(exp, Expect)
    assert exp.text == b"ogin:"
    assert exp.fallbacks == ((Send((b"\r",), 1, ""), b"ogin:"),)
    assert parse_chat_script("ogin: u NO\\-DIAL x").steps[2] == Expect(b"NO-DIAL", 1, "NO\\-DIAL")


def test_say_and_comments_and_hash_inside_a_line() -> None:
    steps = parse_chat_script(
        "# comment\n  # indented comment\nSAY 'hello\\n'\n'' AT#CID=1\n"
    ).steps
    assert steps[0] == Say("hello\n", 3)
    assert isinstance(steps[2], Send)
    assert steps[2].parts == (b"AT#CID=1\r",)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("'' ATZ\nOK 'ATDT", 2, "unterminated ' quote"),
        ("'' ATZ\nTIMEOUT soon", 2, "TIMEOUT needs a number"),
        ("TIMEOUT 0\n'' AT", 1, "out of range"),
        ("'' AT\nABORT", 2, "ABORT needs an argument"),
        ("ABORT ''\n'' AT", 1, "non-empty"),
        ("'' AT\\q", 1, "unknown escape \\q"),
        ("\n\nOK\\d AT", 3, "\\d is only allowed in a send string"),
        ("'' 'AT\\cZ'", 1, "\\c must end"),
        ("'' AT\nREPORT CONNECT", 2, "REPORT is not supported"),
        ("'' AT\\", 1, "backslash at the end"),
        ("'' ^1", 1, "not a control character"),
        ("a-b x", 1, "ends with a send"),
    ],
)
def test_bad_scripts_are_rejected_naming_file_and_line(text: str, line: int, message: str) -> None:
    with pytest.raises(ChatScriptError) as info:
        parse_chat_script(text, "/etc/vpnd/modem.chat")
    assert info.value.line == line
    assert str(info.value).startswith(f"/etc/vpnd/modem.chat:{line}: ")
    assert message in str(info.value)


def test_a_script_with_only_keywords_is_rejected() -> None:
    with pytest.raises(ChatScriptError, match="no expect/send"):
        parse_chat_script("# nothing\nTIMEOUT 5\n", "empty.chat")


def test_missing_script_file_is_reported_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(ChatScriptError, match=r"nothere\.chat: cannot read"):
        load_chat_script(str(tmp_path / "nothere.chat"))


def test_the_shipped_example_script_parses() -> None:
    script = load_chat_script(str(EXAMPLE))
    assert any(isinstance(s, Abort) and s.text == b"BUSY" for s in script.steps)
    assert any(isinstance(s, Expect) and s.text == b"CONNECT" for s in script.steps)


# -- running against an in-memory port with a fake clock ---------------------------------------


class FakeClock:
    """Time that only moves when the fake port waits."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedPort:
    """A port whose replies are queued per written line; an empty read advances the clock."""

    def __init__(self, clock: FakeClock, replies: dict[bytes, bytes]) -> None:
        self.clock = clock
        self.replies = replies
        self.timeout: float | None = 7.0
        self.written = bytearray()
        self.incoming = bytearray()
        self.reads = 0

    def write(self, data: bytes) -> int:
        self.written += data
        for command, reply in self.replies.items():
            if self.written.endswith(command):
                self.incoming += reply
        return len(data)

    def read(self, size: int = 1) -> bytes:
        self.reads += 1
        if not self.incoming:
            assert self.timeout is not None
            self.clock.now += self.timeout  # the read blocked for its whole timeout
            return b""
        data = bytes(self.incoming[:size])
        del self.incoming[:size]
        return data


def test_runner_never_waits_longer_than_the_script_timeout() -> None:
    clock = FakeClock()
    port = ScriptedPort(clock, {})
    script = parse_chat_script("TIMEOUT 3\n'' AT\nOK x", "t.chat")
    result = run_chat(script, port, clock=clock)
    assert not result.ok
    assert "t.chat:3: timeout after 3 s waiting for 'OK'; heard nothing" in result.reason
    assert clock.now - 1000.0 == pytest.approx(3.0)
    assert port.reads <= 3 / 0.1 + 1
    assert port.timeout == 7.0  # restored


def test_runner_pauses_read_input_instead_of_sleeping() -> None:
    clock = FakeClock()
    port = ScriptedPort(clock, {b"AT\r": b"\r\nOK\r\n"})
    result = run_chat(parse_chat_script("'' AT\\r\\d\\c\nOK ''"), port, clock=clock)
    assert result.ok
    assert clock.now - 1000.0 == pytest.approx(1.0)


def test_abort_string_wins_when_it_arrives_before_the_expect_string() -> None:
    clock = FakeClock()
    port = ScriptedPort(clock, {b"ATD1\r": b"\r\nNO CARRIER\r\nCONNECT\r\n"})
    script = parse_chat_script("ABORT 'NO CARRIER'\n'' ATD1\nCONNECT ''")
    result = run_chat(script, port, clock=clock)
    assert not result.ok
    assert result.reason == "aborted: modem said 'NO CARRIER'"
    assert result.matched == "'NO CARRIER'"


def test_input_is_consumed_up_to_each_match() -> None:
    clock = FakeClock()
    port = ScriptedPort(clock, {b"A\r": b"OK\r\n", b"B\r": b"ERROR\r\n"})
    script = parse_chat_script("TIMEOUT 1\n'' A\nOK B\nOK ''")  # the first OK must not count twice
    result = run_chat(script, port, clock=clock)
    assert not result.ok
    assert "timeout after 1 s waiting for 'OK'; last heard '\\r\\nERROR\\r\\n'" in result.reason


def test_sub_expect_sends_again_after_a_timeout() -> None:
    clock = FakeClock()
    port = ScriptedPort(clock, {b"\r": b"login:"})
    script = parse_chat_script("TIMEOUT 1\n'' \\c\nogin:--ogin: guest")
    result = run_chat(script, port, clock=clock)
    assert result.ok, result.reason
    assert port.written == b"\rguest\r"  # the empty sub-send is a bare CR
    assert clock.now - 1000.0 == pytest.approx(1.0)


# -- running against the simulated modem over a PTY pair ------------------------------------


@pytest.fixture
def line():
    require_tools("socat")
    with pty_pair("vpnd-chat") as pair:
        yield pair


def dial(line, script_text: str, **sim_options: object):
    script = parse_chat_script(script_text, "dial.chat")
    port = open_serial(line.a, 115200, rtscts=False, localline=True)
    try:
        with modem_sim(line.b, **sim_options) as sim:
            result = run_chat(script, port)
            return result, sim
    finally:
        port.close()


def test_chat_dials_the_simulated_modem_and_sees_connect(line) -> None:
    result, sim = dial(line, DIAL_SCRIPT)
    assert result.ok, result.reason
    assert result.matched == "'CONNECT'"
    assert sim.commands == ["ATZ", "ATDT5551234"]
    assert sim.online
    assert any("send 'ATDT5551234\\r'" in step for step in result.transcript)


def test_chat_copes_with_a_modem_that_echoes_commands(line) -> None:
    result, sim = dial(line, DIAL_SCRIPT, echo=True)
    assert result.ok, result.reason
    assert sim.commands == ["ATZ", "ATDT5551234"]


def test_busy_line_aborts_the_chat(line) -> None:
    result, sim = dial(line, DIAL_SCRIPT, dial_result="BUSY")
    assert not result.ok
    assert result.reason == "aborted: modem said 'BUSY'"
    assert not sim.online


def test_no_carrier_aborts_the_chat(line) -> None:
    result, _ = dial(line, DIAL_SCRIPT, dial_result="NO CARRIER")
    assert result.reason == "aborted: modem said 'NO CARRIER'"


def test_silent_modem_times_out_within_the_script_timeout(line) -> None:
    script = DIAL_SCRIPT.replace("TIMEOUT 2", "TIMEOUT 0.4")
    result, sim = dial(line, script, dial_result=None)
    assert not result.ok
    assert "dial.chat:7: timeout after 0.4 s waiting for 'CONNECT'" in result.reason
    assert sim.commands == ["ATZ", "ATDT5551234"]


def write_conf(tmp_path: Path, device: str, chat: str) -> object:
    chat_path = tmp_path / "modem.chat"
    chat_path.write_text(chat)
    text = (
        f"mode client\nserver {device}\nlocal 198.19.0.2\nremote 198.19.0.1\n"
        f"speed 115200\nnortscts\nmodemchat {chat_path}\n"
    )
    return parse_config(text, str(tmp_path / "l1.conf"))


def test_chat_test_prints_each_step_and_returns_0_on_connect(line, tmp_path: Path) -> None:
    config = write_conf(tmp_path, line.a, DIAL_SCRIPT)
    out = io.StringIO()
    with modem_sim(line.b):
        code = run_chat_test(config, out)
    text = out.getvalue()
    assert code == 0, text
    assert "send 'ATZ\\r'" in text
    assert "got 'CONNECT'" in text
    assert "chat test OK: last match 'CONNECT'; carrier unknown (device has no modem lines)" in text


def test_chat_test_returns_1_and_names_the_abort_string(line, tmp_path: Path) -> None:
    config = write_conf(tmp_path, line.a, DIAL_SCRIPT)
    out = io.StringIO()
    with modem_sim(line.b, dial_result="BUSY"):
        code = run_chat_test(config, out)
    assert code == 1
    assert "chat test FAILED: aborted: modem said 'BUSY'" in out.getvalue()


def test_chat_test_reports_a_bad_script_with_file_and_line(line, tmp_path: Path) -> None:
    config = write_conf(tmp_path, line.a, "'' AT\nTIMEOUT never\n")
    out = io.StringIO()
    assert run_chat_test(config, out) == 1
    assert f"{tmp_path / 'modem.chat'}:2: TIMEOUT needs a number" in out.getvalue()


def test_chat_test_reports_a_missing_device(tmp_path: Path) -> None:
    config = write_conf(tmp_path, str(tmp_path / "ttyNONE"), DIAL_SCRIPT)
    out = io.StringIO()
    assert run_chat_test(config, out) == 1
    assert "ttyNONE: cannot open serial line" in out.getvalue()


def test_the_shipped_example_script_dials_the_simulated_modem(line) -> None:
    result, sim = dial(line, EXAMPLE.read_text())
    assert result.ok, result.reason
    assert sim.commands == ["AT", "ATZ", "ATE0V1Q0&C1&D2&K3", "ATM0", "ATDT5551234"]
    assert any("say dialling the far site..." in step for step in result.transcript)
