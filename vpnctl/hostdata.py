"""Strings and records that come from hosts are data, never terminal commands.

A host's status record, probe output or ssh error text may hold escape sequences (a hostile or
broken host, a login banner with colours) or values of the wrong type. Everything vpnctl shows
from a host goes through :func:`clean_text` (control and format characters become visible
``\\x1b``-style escapes, so nothing a host sends can move the cursor, retitle the terminal or
hide text), and every status record is type-checked by :func:`check_record` before any code
does arithmetic on it: a malformed record becomes that host's error line, never a TypeError
for the whole fleet.
"""

from __future__ import annotations

import unicodedata
from typing import Any

__all__ = ["RECORD_TYPES", "check_record", "clean_json", "clean_text"]

_KEEP = frozenset("\n\t")


def clean_text(text: object, *, keep_newlines: bool = False) -> str:
    """``text`` with every control (Cc) and format (Cf: bidi overrides, zero-width) character
    replaced by a visible escape; newlines and tabs are kept only with ``keep_newlines``."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for char in text:
        if (keep_newlines and char in _KEEP) or unicodedata.category(char) not in {"Cc", "Cf"}:
            out.append(char)
        else:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return "".join(out)


def clean_json(value: Any) -> Any:
    """A parsed JSON value with every string in it (keys too) passed through clean_text."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_json(v) for v in value]
    return value


_STR, _NUM, _INT = "a string", "a number", "an integer"

#: The type each known field of a status record must have (None is allowed where the daemon
#: writes null); unknown fields pass (a newer runtime may add some), they are only cleaned.
_STRINGS = ("reason", "peer", "config", "mode", "interface", "local", "remote", "key_fingerprint")
_NUMBERS = ("since", "updated", "session_started", "session_age", "last_rtt")
_INTEGERS = (
    "pid",
    "version",
    "rekeys",
    "epoch",
    "bytes_in",
    "bytes_out",
    "packets_in",
    "packets_out",
    "carrier_bytes_in",
    "carrier_bytes_out",
    "missed_keepalives",
    "reconnects",
    "links_up",
)
RECORD_TYPES: dict[str, tuple[str, bool]] = {
    "state": (_STR, False),
    **dict.fromkeys(_STRINGS, (_STR, True)),
    **dict.fromkeys(_NUMBERS, (_NUM, True)),
    **dict.fromkeys(_INTEGERS, (_INT, True)),
}


def _is(value: Any, kind: str) -> bool:
    if kind == _STR:
        return isinstance(value, str)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind == _INT else isinstance(value, int | float)


def check_record(record: Any) -> str | None:
    """None when ``record`` is a well-typed status record, else what is wrong with it (for the
    host's error line; the value is shown cleaned and cut short)."""
    if not isinstance(record, dict):
        return f"the status record is {type(record).__name__}, not a JSON object"
    for key, (kind, nullable) in RECORD_TYPES.items():
        if key not in record:
            if key == "state":
                return "the status record has no 'state'"
            continue
        value = record[key]
        if value is None and nullable:
            continue
        if not _is(value, kind):
            shown = clean_text(repr(value))
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            return f"field {key!r} is {shown}, not {kind}"
    drops = record.get("drops")
    if drops is not None and not (
        isinstance(drops, dict) and all(_is(v, _INT) for v in drops.values())
    ):
        return "field 'drops' is not a mapping of counts"
    return None
