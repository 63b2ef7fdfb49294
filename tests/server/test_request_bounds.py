"""Bounds on the work one request may ask for (400s naming the param, in OpenAI's words), and
requests that are refused or abandoned never reaching a model step (issue 14, item 1).
The stalls themselves are measured by benchmarks/stall.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import ServerProcess, assert_error, start_server, wait_until

pytestmark = pytest.mark.slow  # servers

HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    "path, body, param, code",
    [
        ("/v1/completions", {"prompt": ["Hi"] * 257, "max_tokens": 1}, "prompt", "array_above_max_length"),
        ("/v1/completions", {"prompt": [[1, 2, 3]] * 200 + [[5] * 131072], "max_tokens": 1}, "prompt", "array_above_max_length"),
        ("/v1/completions", {"prompt": "hello " * 120_000, "max_tokens": 1}, "prompt", "context_length_exceeded"),
        ("/v1/chat/completions", {"messages": HI * 2049, "max_tokens": 1}, "messages", "array_above_max_length"),
        ("/tokenize", {"messages": HI * 2049}, "messages", "array_above_max_length"),
        ("/v1/chat/completions", {"messages": [*HI, {"role": "user", "content": [{"type": "text", "text": "x"}] * 2049}], "max_tokens": 1},
         "messages[1].content", "array_above_max_length"),
        ("/v1/chat/completions", {"messages": HI, "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "object_above_max_properties"),
        ("/v1/completions", {"prompt": "Hi", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "object_above_max_properties"),
        ("/detokenize", {"tokens": [1] * 131073}, "tokens", "array_above_max_length"),
    ],
)  # fmt: skip
def test_requests_beyond_the_bounds_are_400s(
    http: httpx.Client, path: str, body: dict, param: str, code: str
) -> None:
    error = assert_error(http.post(path, json=body), 400, type="invalid_request_error", param=param, code=code)
    assert len(error["message"]) < 500


def test_requests_at_the_bounds_are_served(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 1,
                                                "logit_bias": {str(i): 1 for i in range(300)}})  # fmt: skip
    assert r.status_code == 200, r.text
    r = http.post("/tokenize", json={"messages": HI * 2048})
    assert r.status_code == 200, r.text
    r = http.post("/detokenize", json={"tokens": [1000] * 131072})
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------------
# Refused and abandoned requests never reach a model step
# ---------------------------------------------------------------------------------------------

MAX_WAITING = 4


@pytest.fixture(scope="module")
def queue_server(
    default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    proc = start_server(
        default_model_dir, tmp_path_factory.mktemp("queue"),
        "--max-num-seqs", "1", "--max-waiting", str(MAX_WAITING), "--kv-cache-memory", "256MiB",
    )  # fmt: skip
    yield proc
    assert proc.terminate() == 0


def _metric(client: httpx.Client, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", client.get("/metrics").text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def test_refused_and_abandoned_requests_never_reach_a_model_step(queue_server: ServerProcess) -> None:
    """One request runs (max_num_seqs 1); three wait. A batch that does not fit now is a 429, one
    that never can a 400; then the waiting ones are abandoned. None of them was ever scheduled:
    the tokens looked up at admission to a step are the running request's alone."""
    queried = "kestrel_prefix_cache_queries_total"
    with httpx.Client(base_url=queue_server.base_url, timeout=60) as http:
        before = _metric(http, queried)
        long = {"prompt": "Count:", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=long) as running:
            chunks = running.iter_bytes()  # NOTE: kept referenced; a dropped iterator closes the stream
            next(chunks)
            running_tokens = _metric(http, queried) - before
            assert running_tokens > 0
            waiting = []
            for i in range(MAX_WAITING - 1):
                body = {**long, "prompt": f"Waiting number {i}:" + " x" * (10 * i)}
                stream = http.stream("POST", "/v1/completions", json=body)
                response = stream.__enter__()
                assert response.status_code == 200  # headers after the admission wait
                waiting.append(stream)
            assert _metric(http, "kestrel_num_requests_running") == 1
            assert _metric(http, "kestrel_num_requests_waiting") == MAX_WAITING - 1

            batch = {"prompt": [f"Never admitted {i}" for i in range(MAX_WAITING)], "max_tokens": 5}
            r = http.post("/v1/completions", json=batch)
            assert_error(r, 429, type="rate_limit_error", param=None, code="rate_limit_exceeded")
            batch = {"prompt": [f"Never fits {i}" for i in range(MAX_WAITING + 1)], "max_tokens": 5}
            r = http.post("/v1/completions", json=batch)
            error = assert_error(r, 400, type="invalid_request_error", param="prompt",
                                 code="array_above_max_length")  # fmt: skip
            assert "max_waiting" in error["message"]

            for stream in waiting:
                stream.__exit__(None, None, None)
        wait_until(lambda: _metric(http, "kestrel_num_requests_running") == 0
                   and _metric(http, "kestrel_num_requests_waiting") == 0, "an idle engine")  # fmt: skip
        assert _metric(http, queried) - before == running_tokens
