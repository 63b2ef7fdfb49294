"""Server fixtures: real `python -m server` processes on free loopback ports, and SSE helpers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from engine import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 240.0
API_KEY = "test-secret-key"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    base_url: str
    port: int
    log_path: Path
    api_key: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def sdk(self, **kwargs: Any) -> OpenAI:
        return OpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=self.api_key or "unused",
            max_retries=0,
            **kwargs,
        )

    def async_sdk(self, **kwargs: Any) -> AsyncOpenAI:
        return AsyncOpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=self.api_key or "unused",
            max_retries=0,
            **kwargs,
        )

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def start_server(
    model_dir: Path, log_dir: Path, *args: str, api_key: str | None = None
) -> ServerProcess:
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "server", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), *args]  # fmt: skip
    if api_key:
        cmd += ["--api-key", api_key]
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("KESTREL_") or k == "KESTREL_HOME"
    }
    env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", port, log_path, api_key)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(
        f"server did not become healthy in {STARTUP_TIMEOUT} s:\n{server.log()[-4000:]}"
    )


@pytest.fixture(scope="session")
def server(
    default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """The shared server: the default dtype (bfloat16) and limits, a short SSE ping interval so
    streams carry pings."""
    proc = start_server(
        default_model_dir,
        tmp_path_factory.mktemp("server"),
        "--kv-cache-memory", "256MiB",
        "--sse-ping-interval", "0.05",
        "--cors-origins", "http://example.test",
        "--model-aliases", "smol,gpt-test",
    )  # fmt: skip
    yield proc
    code = proc.terminate()
    assert code == 0, proc.log()[-4000:]


@pytest.fixture(scope="session")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server on Qwen2.5-Coder-0.5B-Instruct (its chat template renders tools)."""
    from engine.assets import resolve_model

    proc = start_server(
        resolve_model("qwen2.5-coder-0.5b-instruct"),
        tmp_path_factory.mktemp("qwen"),
        "--kv-cache-memory", "128MiB",
    )  # fmt: skip
    yield proc
    assert proc.terminate() == 0, proc.log()[-4000:]


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> OpenAI:
    return server.sdk()


@pytest.fixture(scope="session")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60.0) as c:
        yield c


@pytest.fixture(scope="session")
def tokenizer(default_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(default_model_dir)


# ---------------------------------------------------------------------------------------------
# SSE
# ---------------------------------------------------------------------------------------------


@dataclass
class SSEStream:
    events: list[str]  # the data of each event, in order
    comments: list[str]
    raw: bytes


def parse_sse(raw: bytes) -> SSEStream:
    """Parse an SSE body strictly as OpenAI frames it: `data: <payload>\\n\\n` (comments allowed)."""
    text = raw.decode("utf-8")
    assert "\r" not in text, "SSE lines must end in \\n"
    assert text.endswith("\n\n"), repr(text[-50:])
    events, comments = [], []
    for block in text[:-2].split("\n\n"):
        data_lines = []
        for line in block.split("\n"):
            if line.startswith(":"):
                comments.append(line[1:].strip())
            else:
                assert line.startswith("data: "), f"unexpected SSE line {line!r}"
                data_lines.append(line[len("data: ") :])
        if data_lines:
            assert len(data_lines) == 1, block
            events.append(data_lines[0])
    return SSEStream(events, comments, raw)


def stream_json(stream: SSEStream) -> list[dict[str, Any]]:
    """The JSON chunks of a stream that ends in [DONE] (asserted)."""
    assert stream.events and stream.events[-1] == "[DONE]", stream.events[-3:]
    assert "[DONE]" not in stream.events[:-1]
    return [json.loads(e) for e in stream.events[:-1]]


def assert_error(
    response: httpx.Response, status: int, *, type: str, param: str | None, code: str | None
) -> dict:
    assert response.status_code == status, response.text[:2000]
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert (error["type"], error["param"], error["code"]) == (type, param, code), error
    return error


# Long enough for a busy 2-core host; a condition that never holds still fails.
WAIT_TIMEOUT_S = 30.0


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT_TIMEOUT_S) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)
