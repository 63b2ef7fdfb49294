"""Shutdown an orchestrator can rely on: real servers sent SIGTERM / SIGINT while requests run.

Streams still running when the drain timeout ends get an SSE error event and [DONE], requests
not yet answered a 503, the access log says aborted; the process exits soon after the drain
timeout (asserted generously for a busy host; the measured figure is printed), an idle one at
once, and a second signal exits at once."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from .conftest import ServerProcess, parse_sse, start_server, wait_until

pytestmark = pytest.mark.slow  # starts servers

DRAIN_TIMEOUT = 2.0
SLACK = 3.0  # the bound is drain_timeout + 1 s; a loaded 2-core host gets 2 s more
LONG = {"max_tokens": 4000, "ignore_eos": True}


def _start(model_dir: Path, tmp_path: Path, drain_timeout: float) -> ServerProcess:
    return start_server(
        model_dir, tmp_path, "--kv-cache-memory", "256MiB", "--drain-timeout", str(drain_timeout)
    )


def _in_background(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_sigterm_ends_running_requests_with_an_error_then_exits(
    default_model_dir: Path, tmp_path: Path
) -> None:
    server = _start(default_model_dir, tmp_path, DRAIN_TIMEOUT)
    sdk = server.sdk(timeout=60)
    model = sdk.models.list().data[0].id

    def sdk_stream() -> list[str]:
        texts = []
        for chunk in sdk.completions.create(model=model, prompt="Count:", stream=True,
                                            max_tokens=4000, extra_body={"ignore_eos": True}):  # fmt: skip
            texts.append(chunk.choices[0].text)
        return texts

    def non_streaming() -> httpx.Response:
        body = {"prompt": "Once upon a time", **LONG}
        return httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)

    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        body = {"messages": [{"role": "user", "content": "Count to a million."}], "stream": True, **LONG}
        with http.stream("POST", "/v1/chat/completions", json=body) as stream:
            assert stream.status_code == 200
            chunks = stream.iter_bytes()
            raw = bytearray(next(chunks))
            sdk_thread, sdk_result = _in_background(sdk_stream)
            plain_thread, plain_result = _in_background(non_streaming)
            wait_until(lambda: _num_running(server) >= 3, "three requests running")
            sent = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            for chunk in chunks:
                raw += chunk
        stream_end = time.monotonic() - sent
    code = server.proc.wait(DRAIN_TIMEOUT + SLACK + 30)
    elapsed = time.monotonic() - sent
    print(f"SIGTERM -> stream ended {stream_end:.2f} s, process exited {elapsed:.2f} s "
          f"(drain_timeout {DRAIN_TIMEOUT} s)")  # fmt: skip
    assert code == 0
    assert DRAIN_TIMEOUT - 0.1 <= stream_end <= DRAIN_TIMEOUT + SLACK
    assert elapsed <= DRAIN_TIMEOUT + SLACK

    # The raw stream: content, then one error event, then [DONE].
    events = parse_sse(bytes(raw)).events
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert set(error) == {"error"}
    assert error["error"]["type"] == "server_error"
    assert error["error"]["code"] == "server_shutting_down"
    assert any(json.loads(e).get("choices") and json.loads(e)["choices"][0]["delta"].get("content")
               for e in events[:-2])  # fmt: skip

    # The SDK raises the in-band error; the request still waiting for its body gets a 503.
    sdk_thread.join(10)
    plain_thread.join(10)
    assert isinstance(sdk_result.get("error"), openai.APIError), sdk_result
    assert "shutting down" in str(sdk_result["error"])
    response = plain_result["value"]
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "server_shutting_down"

    log = server.log()
    assert log.count("aborted=shutdown") == 3, log[-3000:]
    for line in log.splitlines():
        if "aborted=shutdown" in line:
            assert "status=503" in line, line
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]


def _num_running(server: ServerProcess) -> int:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("kestrel_num_requests_running "):
            return int(float(line.split()[1]))
    return 0


def test_idle_server_exits_at_once(default_model_dir: Path, tmp_path: Path) -> None:
    server = _start(default_model_dir, tmp_path, 30.0)
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(30)
    elapsed = time.monotonic() - sent
    print(f"idle server: SIGTERM -> exit in {elapsed:.2f} s")
    assert code == 0
    assert elapsed < 2.0  # ~0.2 s on an idle host
    assert "Traceback" not in server.log()


def test_second_signal_forces_exit(default_model_dir: Path, tmp_path: Path) -> None:
    server = _start(default_model_dir, tmp_path, 60.0)
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        body = {"prompt": "Count:", "stream": True, **LONG}
        with http.stream("POST", "/v1/completions", json=body) as stream:
            chunks = stream.iter_bytes()
            next(chunks)
            server.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: "a second SIGTERM or SIGINT exits at once" in server.log(),
                       "the first signal's log line")  # fmt: skip
            time.sleep(0.3)
            assert server.proc.poll() is None  # draining: the stream runs on
            sent = time.monotonic()
            server.proc.send_signal(signal.SIGINT)
            code = server.proc.wait(30)
            elapsed = time.monotonic() - sent
            with pytest.raises(httpx.HTTPError):
                for _ in chunks:
                    pass
    print(f"second signal -> exit in {elapsed:.2f} s")
    assert code == 128 + signal.SIGINT
    assert elapsed < 2.0
    assert "second signal (SIGINT) during shutdown" in server.log()
