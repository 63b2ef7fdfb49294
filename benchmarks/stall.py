"""Does any request stall the others? One stream runs while hostile requests go in one by one;
reports, per hostile request, its status and time and the stream's longest gap between tokens
while it was in flight (target: under 0.5 s).

    python benchmarks/stall.py                       # starts a Kestrel server on the default model
    python benchmarks/stall.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
JSON = {"Content-Type": "application/json"}


def hostile_requests() -> Iterator[tuple[str, str, bytes]]:
    """(name, path, body): the shapes that stalled every stream for seconds (issue 14)."""
    prompts = ["lorem ipsum " * 666 + "lorem..."] * 1000  # 1,000 prompts of 8,000 characters
    yield "completions, 1000 prompts x 8000 chars", "/v1/completions", _body({"prompt": prompts, "max_tokens": 1})
    yield "completions, 256 prompts x 8000 chars", "/v1/completions", _body({"prompt": prompts[:256], "max_tokens": 1})
    yield "chat, one 1M-char message", "/v1/chat/completions", _body(
        {"messages": [{"role": "user", "content": "lorem ipsum " * 83333}], "max_tokens": 1})
    yield "chat, 100k messages", "/v1/chat/completions", _body(
        {"messages": [{"role": "user", "content": "hi"}] * 100_000, "max_tokens": 1})
    yield "chat, 100k content parts", "/v1/chat/completions", _body(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}] * 100_000}], "max_tokens": 1})
    yield "/detokenize, 1M ids", "/detokenize", _body({"tokens": [1000] * 1_000_000})
    yield "logit_bias, 49k entries", "/v1/chat/completions", _body(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
         "logit_bias": {str(i): 1.0 for i in range(49_000)}})
    yield "/tokenize, 2M chars", "/tokenize", _body({"prompt": "lorem ipsum " * 166_666})
    yield "completions, one 8M-char prompt", "/v1/completions", _body({"prompt": "lorem ipsum " * 690_000, "max_tokens": 1})  # fmt: skip


def _body(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


class Stream:
    """A long streamed completion; records each chunk's arrival time."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.times: list[float] = []
        self.done = threading.Event()
        body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 8000, "ignore_eos": True, "stream": True}
        self._thread = threading.Thread(target=self._run, args=(url, headers, body), daemon=True)
        self._thread.start()

    def _run(self, url: str, headers: dict[str, str], body: dict[str, Any]) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=600) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.times.append(time.perf_counter())
                    if self.done.is_set():
                        return
        finally:
            self.done.set()

    def longest_gap(self, start: float, end: float) -> float:
        """The longest gap between chunks that overlaps [start, end]."""
        before = [t for t in self.times if t < start][-1:]
        after = [t for t in self.times if t > end][:1]
        times = before + [t for t in self.times if start <= t <= end] + after
        return max((b - a for a, b in zip(times, times[1:])), default=float("nan"))


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "server", "--model", args.model, "--port", str(port), *args.server_args]
    log = open(args.log, "wb")  # noqa: SIM115 - the server's lifetime
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}; see {args.log}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server; default: start one")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--api-key", default=os.environ.get("KESTREL_API_KEY"))
    parser.add_argument("--log", default="/tmp/kestrel-stall.log")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds between hostile requests")
    parser.add_argument("server_args", nargs="*", help="extra flags for the started server (after --)")
    args = parser.parse_args()
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        stream = Stream(url, headers)
        while len(stream.times) < 5 and not stream.done.is_set():
            time.sleep(0.05)
        time.sleep(args.settle)
        base_start = time.perf_counter()
        time.sleep(2.0)
        print(f"{'request':<42} {'status':>6} {'time s':>7} {'longest gap s':>14}")
        print(f"{'(none: baseline, 2 s)':<42} {'':>6} {'':>7} {stream.longest_gap(base_start, time.perf_counter()):>14.3f}")
        worst = 0.0
        with httpx.Client(base_url=url, headers={**headers, **JSON}, timeout=600) as client:
            for name, path, body in hostile_requests():
                start = time.perf_counter()
                r = client.post(path, content=body)
                end = time.perf_counter()
                time.sleep(0.3)  # the gap that spans the end of the request
                gap = stream.longest_gap(start, end)
                worst = max(worst, gap)
                print(f"{name:<42} {r.status_code:>6} {end - start:>7.2f} {gap:>14.3f}", flush=True)
                time.sleep(args.settle)
        print(f"worst gap {worst:.3f} s (target < 0.5 s); the stream {'ended early' if stream.done.is_set() else 'ran throughout'}")
        stream.done.set()
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


if __name__ == "__main__":
    main()
