"""Log lines a client cannot forge: escaping, `key=value` fields, a filter for our loggers."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping

_SHORT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_QUOTE_TRIGGERS = frozenset(' "=')
TRACEBACK_INDENT = "  "


def _escape_char(char: str) -> str:
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def escape(text: str) -> str:
    """`text` on one line of printable characters: a backslash and every character that
    `str.isprintable` rejects (C0 incl. \\n \\r \\t, DEL, C1 incl. U+0085, U+2028/U+2029, bidi
    and other format characters, spaces other than ' ') become `\\n`, `\\xNN` or `\\uNNNN`."""
    return "".join(_escape_char(c) if c == "\\" or not c.isprintable() else c for c in text)


def one_line(text: str) -> str:
    """`text` unchanged if it is printable, else escaped."""
    return text if text.isprintable() else escape(text)


def format_fields(fields: Mapping[str, object]) -> str:
    """`key=value key="a value" ...` (logfmt): every value escaped, and double-quoted (with `\\"`
    for a quote) when it is empty or holds a space, a quote or an '='."""
    parts = []
    for key, value in fields.items():
        text = escape(str(value))
        if not text or not _QUOTE_TRIGGERS.isdisjoint(text):
            text = '"' + text.replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


class EscapeFilter(logging.Filter):
    """Keeps a record from writing a line that looks like another record: its message becomes one
    printable line, and its traceback (whose exception messages may hold client text) has every
    line indented and escaped, so no line of it starts where a record would."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.isprintable():
            record.msg, record.args = escape(message), ()
        if record.exc_info and not record.exc_text:
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_text = "\n".join(TRACEBACK_INDENT + one_line(x) for x in text.split("\n"))
        return True

