"""Log injection: whatever a client puts in a request, the server logs one access line for it and
no line of the client's (paths, queries, headers, model names; raw and percent-encoded)."""

from __future__ import annotations

import io
import logging
import re
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from server.logs import TRACEBACK_INDENT, EscapeFilter, escape, format_fields

from .conftest import ServerProcess, start_server, wait_until

FORGED = "2026-01-01 00:00:00,000 INFO kestrel.access: request_id=forged path=/ status=200"
RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: \S")
ACCESS = re.compile(r"\S+ \S+ INFO kestrel\.access: (.*)")
ACCESS_KEYS = ["request_id", "method", "path", "status", "latency_ms"]
CALL_KEYS = ["request_id", "method", "path", "status", "prompt_tokens", "completion_tokens",
             "latency_ms"]  # fmt: skip
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
NASTY = [
    "\n" + FORGED,
    "\r\n" + FORGED,
    "\r" + FORGED,
    "\u2028" + FORGED,
    "\u2029\x85" + FORGED,
    "\x1b[31mred\x1b[0m",
    "\t\x00\x0b\x0c\x1c\x1d\x1e\x7f\x9b\u202e\ufeff\xa0",
    'a b"c\\n=d \\"',
]

# --- the parser an operator's tooling would use -------------------------------------------------

_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"=]+)(?: |$)')
_ESCAPE = re.compile(r'\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|[\\"nrt])')
_SHORT = {"\\": "\\", '"': '"', "n": "\n", "r": "\r", "t": "\t"}


def unescape(text: str) -> str:
    return _ESCAPE.sub(lambda m: _SHORT.get(m[1]) or chr(int(m[1][1:], 16)), text)


def parse_fields(text: str) -> dict[str, str]:
    """logfmt: `key=value` or `key="value"` separated by single spaces, values unescaped."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        match = _FIELD.match(text, pos)
        assert match, f"unparsable at {pos}: {text!r}"
        value = match[2][1:-1] if match[2].startswith('"') else match[2]
        fields[match[1]] = unescape(value)
        pos = match.end()
    return fields


# --- unit tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "char, escaped",
    [("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"), ("\\", "\\\\"), ("\x00", "\\x00"),
     ("\x1b", "\\x1b"), ("\x7f", "\\x7f"), ("\x85", "\\x85"), ("\x9b", "\\x9b"),
     ("\xa0", "\\xa0"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"), ("\u202e", "\\u202e"),
     ("\U000e0001", "\\U000e0001")],
)  # fmt: skip
def test_escape(char: str, escaped: str) -> None:
    assert escape(f"a{char}b") == f"a{escaped}b"


def test_escape_covers_every_control_and_line_separator() -> None:
    for code in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]:
        escaped = escape(chr(code))
        assert escaped.startswith("\\") and escaped.isascii() and escaped.isprintable(), code
    assert escape("/v1/models/é ok\"'") == "/v1/models/é ok\"'"


def test_format_fields_round_trips_through_a_logfmt_parser() -> None:
    values = {f"k{i}": v for i, v in enumerate([*NASTY, "", "plain", "a=b", '"', "\\", "é"])}
    line = format_fields(values)
    assert line.isprintable()
    assert parse_fields(line) == values
    assert format_fields({"a": 1, "b": "x y", "c": 'q"', "d": "", "e": "\\n"}) == (
        'a=1 b="x y" c="q\\"" d="" e=\\\\n'
    )


def test_escape_filter_keeps_messages_and_tracebacks_from_forging_records() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(EscapeFilter())  # as server/__main__.py sets up its handler
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("tests.log_injection")
    log.propagate = False
    log.addHandler(handler)
    try:
        log.warning("model %s", "m\n" + FORGED + "\x1b[31m")
        try:
            raise RuntimeError("boom\n" + FORGED + "\u2028" + FORGED)
        except RuntimeError:
            log.exception("request %s failed", "r\r1")
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert all(line.isprintable() for line in lines), lines
    assert [line for line in lines if RECORD.match(line)] == [lines[0], lines[1]]
    assert lines[0].endswith("model m\\n" + FORGED + "\\x1b[31m")
    assert lines[1].endswith("request r\\r1 failed")
    assert all(line.startswith(TRACEBACK_INDENT) for line in lines[2:])
    assert lines[-2:] == [
        TRACEBACK_INDENT + "RuntimeError: boom",
        TRACEBACK_INDENT + FORGED + "\\u2028" + FORGED,
    ]


# --- a real server --------------------------------------------------------------------------------


@dataclass
class LoggedServer:
    server: ServerProcess
    start: int  # log offset once healthy: what follows are requests' records only

    def lines(self) -> list[str]:
        return self.server.log()[self.start :].split("\n")[:-1]

    def access_lines(self) -> list[dict[str, str]]:
        return [parse_fields(m[1]) for line in self.lines() if (m := ACCESS.fullmatch(line))]


@dataclass
class Reply:
    status: int
    request_id: str | None  # the echoed X-Request-Id; None if uvicorn refused the request


@pytest.fixture(scope="module")
def logged(
    default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LoggedServer]:
    server = start_server(
        default_model_dir, tmp_path_factory.mktemp("log-injection"), "--kv-cache-memory", "256MiB"
    )
    # The start-up health checks' access lines may be written after the server answers: wait for
    # one of our own before taking the offset where the tests' records begin.
    marker = f"ready-{uuid.uuid4().hex}"
    httpx.get(f"{server.base_url}/health", headers={"X-Request-Id": marker})
    wait_until(lambda: f"request_id={marker}" in server.log(), "the marker request's access line")
    yield LoggedServer(server, len(server.log()))
    assert server.terminate() == 0, server.log()[-4000:]


def raw_get(port: int, target: bytes, headers: bytes = b"") -> Reply:
    """GET with the request target and header lines exactly as given (no client normalisation)."""
    request = b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%s\r\n" % (target, headers)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, *header_lines = data.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    echoed = dict(line.lower().split(": ", 1) for line in header_lines).get("x-request-id")
    return Reply(int(status_line.split()[1]), echoed)


def settle(logged: LoggedServer, num_before: int, replies: list[Reply]) -> list[dict[str, str]]:
    """The access lines of `replies` (asserted: exactly one per request the app saw, none for one
    uvicorn refused), once a sentinel request has been logged; and the log asserted clean: every
    line a printable record, every access line parsable with our request ids only."""
    sentinel = f"sentinel-{uuid.uuid4().hex}"
    health = httpx.get(f"{logged.server.base_url}/health", headers={"X-Request-Id": sentinel})
    assert health.status_code == 200
    deadline = time.monotonic() + 10
    lines = logged.access_lines()
    while not any(line["request_id"] == sentinel for line in lines):
        assert time.monotonic() < deadline, "sentinel never logged:\n" + logged.server.log()[-3000:]
        time.sleep(0.05)
        lines = logged.access_lines()
    new = [line for line in lines[num_before:] if line["request_id"] != sentinel]
    expected = Counter(reply.request_id for reply in replies if reply.request_id is not None)
    assert Counter(line["request_id"] for line in new) == expected, new
    for line in logged.lines():
        assert line.isprintable() and RECORD.match(line), repr(line)
    for fields in lines:
        assert list(fields) in (ACCESS_KEYS, CALL_KEYS), fields
        assert fields["request_id"] != "forged"
    return new


def _by_id(lines: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {line["request_id"]: line for line in lines}


@pytest.mark.slow
def test_percent_encoded_path_is_logged_decoded_and_escaped_on_one_line(
    logged: LoggedServer,
) -> None:
    before = len(logged.access_lines())
    paths = [f"/v1/models/{text}" for text in NASTY] + ["/" + "\n" * 300]
    replies = [raw_get(logged.server.port, quote(path).encode()) for path in paths]
    assert [r.status for r in replies] == [404] * len(paths)
    lines = _by_id(settle(logged, before, replies))
    for path, reply in zip(paths, replies):
        assert lines[reply.request_id]["path"] == path[:200]
        assert lines[reply.request_id]["method"] == "GET"


@pytest.mark.slow
def test_query_is_not_logged_and_cannot_forge_a_line(logged: LoggedServer) -> None:
    before = len(logged.access_lines())
    targets = [b"/v1/models?x=" + quote(text, safe="").encode() for text in NASTY]
    replies = [raw_get(logged.server.port, target) for target in targets]
    assert [r.status for r in replies] == [200] * len(targets)
    lines = settle(logged, before, replies)
    assert {line["path"] for line in lines} == {"/v1/models"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "target, headers",
    [
        (b"/v1/models/\x1b[31mred", b""),
        (b"/v1/models/\xe2\x80\xa8" + FORGED.encode(), b""),
        (b"/a\n" + FORGED.encode(), b""),
        (b"/a\r" + FORGED.encode(), b""),
        (b"/v1/models?x=\x1b[31m", b""),
        (b"/v1/models", b"User-Agent: \x1b[31mred\r\n"),
        (b"/v1/models", b"X-Request-Id: \x1b[31m\r\n"),
        (b"/v1/models", b"X-Request-Id: abc\n" + FORGED.encode() + b"\r\n"),
        (b"/v1/models", b"X-Request-Id: abc\r" + FORGED.encode() + b"\r\n"),
        (b"/v1/models", b"X-Request-Id: abc\r\n " + FORGED.encode() + b"\r\n"),
    ],
)
def test_raw_control_bytes_are_refused_before_the_app(
    logged: LoggedServer, target: bytes, headers: bytes
) -> None:
    before = len(logged.access_lines())
    reply = raw_get(logged.server.port, target, headers)
    assert (reply.status, reply.request_id) == (400, None)
    settle(logged, before, [reply])


@pytest.mark.slow
def test_unsafe_request_ids_are_replaced_and_headers_cannot_forge_a_line(
    logged: LoggedServer,
) -> None:
    before = len(logged.access_lines())
    unsafe = [
        b"a b",
        b'a"b',
        b"a\tb",
        b"x" * 129,
        b"a=b",
        b"\xe2\x80\xa8" + FORGED.encode(),
        b"\xc2\x85",
    ]
    replies = [
        raw_get(logged.server.port, b"/v1/models", b"X-Request-Id: %s\r\n" % v) for v in unsafe
    ]
    ok = raw_get(logged.server.port, b"/v1/models", b"X-Request-Id: client.id-1:2\r\n")
    agent = raw_get(
        logged.server.port,
        b"/v1/models",
        b"User-Agent: \xe2\x80\xa8\xc2\x85" + FORGED.encode() + b"\r\n",
    )
    assert [r.status for r in [*replies, ok, agent]] == [200] * (len(unsafe) + 2)
    assert all(GENERATED_ID.fullmatch(r.request_id or "") for r in replies), replies
    assert ok.request_id == "client.id-1:2"
    settle(logged, before, [*replies, ok, agent])


@pytest.mark.slow
def test_model_names_cannot_forge_a_line(logged: LoggedServer) -> None:
    before = len(logged.access_lines())
    replies = []
    with httpx.Client(base_url=logged.server.base_url, timeout=60) as http:
        for model in NASTY:
            for route, extra in [("/v1/chat/completions", {"messages": [{"role": "user", "content": model}]}),
                                 ("/v1/completions", {"prompt": model})]:  # fmt: skip
                r = http.post(route, json={"model": model, "max_tokens": 1, **extra})
                assert r.status_code == 404, r.text
                replies.append(Reply(r.status_code, r.headers["x-request-id"]))
        r = http.post("/v1/chat/completions", headers={"X-Request-Id": "chat-ok"},
                      json={"messages": [{"role": "user", "content": NASTY[0]}], "max_tokens": 1})  # fmt: skip
        assert r.status_code == 200, r.text
        replies.append(Reply(200, "chat-ok"))
    lines = _by_id(settle(logged, before, replies))
    assert list(lines["chat-ok"]) == CALL_KEYS
