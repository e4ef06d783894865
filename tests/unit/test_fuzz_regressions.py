"""Every input the fuzzers ever crashed on, replayed against its contract, plus the seeds.

fuzz/regressions/TARGET/NAME holds the input that made target TARGET fail (see fuzz/run_all.py);
the contract functions in fuzz/contracts.py need no atheris.  The named tests below state each
bug found in plain words.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fuzz.contracts import TARGETS
from vpnctl.deploy import parse_status_output
from vpnctl.fleetstatus import FleetStatus, MalformedAnswer, _judge, format_table, parse_host_output

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
CASES = sorted(
    p for kind in ("regressions", "seeds") for p in (FUZZ / kind).glob("*/*") if p.is_file()
)


@pytest.mark.parametrize(
    "path", CASES, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}/{p.name}"
)
def test_fuzz_input_keeps_its_contract(path: Path) -> None:
    TARGETS[path.parent.name](path.read_bytes())


MANIFEST = {"links": {"alpha": {"role": "server", "peer": "h2"}}}


def status_text(record: str, keymtime: str = "1779990000", now: str = "1780000000.5") -> str:
    return (
        f"{now}\n@@vpnctl alpha\nconfig yes\nalive yes\n{record}\n"
        f"keymtime {keymtime}\npidfile 123\n"
    )


def show(text: str) -> str:
    """The table of one host's answer, or the BAD ANSWER line `vpnctl status` shows instead."""
    try:
        ends = parse_host_output("h1", MANIFEST, text)
    except MalformedAnswer as exc:
        return f"BAD ANSWER h1: {exc}"
    status = FleetStatus([_judge(e.link, [e]) for e in ends], {})
    json.dumps(status.to_json(), allow_nan=False)
    return format_table(status)


def test_a_keymtime_that_is_not_a_number_means_an_unknown_key_age() -> None:
    found = parse_status_output(status_text("-", keymtime="@@vpnctl alpha"))
    assert found["alpha"].key_mtime is None


@pytest.mark.parametrize("now", ["nan", "inf", "-inf", "1e400"])
def test_a_host_clock_that_is_not_finite_is_not_trusted(now: str) -> None:
    record = json.dumps({"state": "up", "pid": 123, "updated": 1780000000.2, "since": 1.0})
    show(status_text(record, now=now))  # no crash; the local clock stands in


@pytest.mark.parametrize(
    "field",
    [
        {"since": float("inf")},
        {"since": float("nan")},
        {"last_rtt": "fast"},
        {"last_rtt": float("nan")},
        {"bytes_in": "lots"},
        {"bytes_out": -5},
        {"bytes_in": 1e300},
        {"peer": 5},
        {"key_fingerprint": ["x"]},
        {"reason": {"a": 1}},
        {"updated": float("nan")},
        {"pid": [1]},
    ],
    ids=lambda f: "-".join(f"{k}={v!r}" for k, v in f.items()),
)
def test_a_record_field_of_the_wrong_type_or_not_finite_is_shown_as_unknown(
    field: dict[str, object],
) -> None:
    record = {"state": "up", "pid": 123, "updated": 1780000000.2, "since": 1779999000.0}
    record.update(field)
    table = show(status_text(json.dumps(record)))
    assert "alpha" in table


def test_a_status_record_nested_too_deep_for_json_is_no_record() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    found = parse_status_output(status_text(deep))
    record = found["alpha"].record
    assert record is not None
    assert record["state"] == "bad answer"
    assert "not JSON" in record["reason"]
