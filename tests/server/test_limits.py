"""A second server with an API key and tiny limits: auth, 413, 429 + Retry-After, a KV pool too
small for a request, and graceful SIGTERM (in-flight streams finish, exit code 0)."""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import (
    API_KEY,
    ServerProcess,
    assert_error,
    parse_sse,
    start_server,
    stream_json,
    wait_until,
)

pytestmark = pytest.mark.slow  # real or tiny model weights, kernel builds or servers

MAX_REQUEST_BYTES = 65536
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def limited(
    default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    proc = start_server(
        default_model_dir,
        tmp_path_factory.mktemp("limited"),
        "--max-num-seqs", "1",
        "--max-waiting", "1",
        "--kv-cache-memory", "4MiB",
        "--max-request-bytes", str(MAX_REQUEST_BYTES),
        "--retry-after", "2",
        "--drain-timeout", "30",
        "--default-max-tokens", "3",
        api_key=API_KEY,
    )  # fmt: skip
    yield proc
    if proc.proc.poll() is None:
        assert proc.terminate() == 0


@pytest.fixture(scope="module")
def authed(limited: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limited.base_url, headers=limited.headers, timeout=60.0) as c:
        yield c


def ok(client: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 200, r.text


def test_api_key_required_except_health(limited: ServerProcess, authed: httpx.Client) -> None:
    with httpx.Client(base_url=limited.base_url, timeout=30) as anon:
        assert anon.get("/health").status_code == 200
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/metrics"),
                             ("POST", "/tokenize"), ("GET", "/nowhere")):  # fmt: skip
            assert_error(
                anon.request(method, path),
                401,
                type="invalid_request_error",
                param=None,
                code="invalid_api_key",
            )
        r = anon.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert_error(r, 401, type="invalid_request_error", param=None, code="invalid_api_key")
        assert r.headers["x-request-id"]
    assert authed.get("/v1/models").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"{limited.base_url}/v1", api_key="wrong", max_retries=0
        ).models.list()
    assert [m.id for m in limited.sdk().models.list().data]
    ok(authed)


def test_body_too_large(authed: httpx.Client) -> None:
    big = json.dumps({"prompt": "x" * MAX_REQUEST_BYTES, "max_tokens": 1}).encode()
    assert_error(authed.post("/v1/completions", content=big, headers=JSON), 413,
                 type="invalid_request_error", param=None, code="request_too_large")  # fmt: skip

    def chunked() -> Iterator[bytes]:  # no Content-Length: the streamed size is what counts
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    assert_error(authed.post("/v1/completions", content=chunked(), headers=JSON), 413,
                 type="invalid_request_error", param=None, code="request_too_large")  # fmt: skip
    ok(authed)


def test_request_larger_than_kv_pool(authed: httpx.Client) -> None:
    # 4 MiB holds ~11 blocks of 16 tokens: far below max_model_len, so the engine refuses it.
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400}
    assert_error(authed.post("/v1/chat/completions", json=body), 400,
                 type="invalid_request_error", param="messages", code="context_length_exceeded")  # fmt: skip
    body = {"prompt": "Hi", "max_tokens": 400}
    assert_error(authed.post("/v1/completions", json=body), 400,
                 type="invalid_request_error", param="prompt", code="context_length_exceeded")  # fmt: skip
    ok(authed)


def test_queue_full_is_429_with_retry_after(limited: ServerProcess, authed: httpx.Client) -> None:
    long = {"prompt": "Count:", "max_tokens": 150, "ignore_eos": True, "stream": True}
    with authed.stream("POST", "/v1/completions", json=long) as running:
        assert running.status_code == 200
        running_chunks = (
            running.iter_bytes()
        )  # NOTE: kept referenced; a dropped iterator closes the stream
        next(running_chunks)  # decoding: it holds the only running slot
        with authed.stream("POST", "/v1/completions", json=long) as waiting:
            assert waiting.status_code == 200  # queued: headers after the admission wait
            r = authed.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
            assert_error(r, 429, type="rate_limit_error", param=None, code="rate_limit_exceeded")
            assert r.headers["retry-after"] == "2"
            r = authed.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "x"}], "stream": True},
            )
            assert_error(r, 429, type="rate_limit_error", param=None, code="rate_limit_exceeded")
    # the server notices the two closed streams asynchronously; then it admits again
    wait_until(
        lambda: not re.search(
            r"^kestrel_num_requests_(running|waiting) [1-9]", authed.get("/metrics").text, re.MULTILINE
        ),
        "aborted streams no longer counted",
    )
    ok(authed)


def test_server_default_max_tokens(authed: httpx.Client) -> None:
    """Request value > server config default > the model's / OpenAI's."""
    r = authed.post("/v1/completions", json={"prompt": "Count:", "ignore_eos": True}).json()
    assert r["usage"]["completion_tokens"] == 3
    r = authed.post(
        "/v1/completions", json={"prompt": "Count:", "ignore_eos": True, "max_tokens": 5}
    ).json()
    assert r["usage"]["completion_tokens"] == 5
    body = {"messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True}
    assert authed.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"] == 3


def test_sigterm_drains_in_flight_stream_then_exits_0(
    limited: ServerProcess, authed: httpx.Client
) -> None:
    """Last in this module: it stops the server."""
    body = {"prompt": "Count:", "max_tokens": 40, "ignore_eos": True, "stream": True}
    with authed.stream("POST", "/v1/completions", json=body) as stream:
        raw = bytearray()
        chunks = stream.iter_bytes()
        raw += next(chunks)
        limited.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no new connections while draining
            httpx.get(f"{limited.base_url}/health", timeout=5)
        for chunk in chunks:
            raw += chunk
    events = stream_json(parse_sse(bytes(raw)))
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for e in events if e["choices"][0]["text"]) >= 30
    assert limited.proc.wait(30) == 0
    log = limited.log()
    assert "Traceback" not in log, log[-3000:]
