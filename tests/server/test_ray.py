"""Kestrel on Ray Serve: `python -m server --replicas 2` (one local Ray cluster for the module),
driven with the OpenAI SDK and httpx through Serve's HTTP proxy on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from .test_errors import CASES as ERROR_CASES
from .conftest import REPO_ROOT, assert_error, free_port, parse_sse, stream_json, wait_until

pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install -e '.[ray]'")

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT = 600.0  # a local cluster, the proxy and two replicas on a busy 2-core host
REPLICA_HEADER = "x-kestrel-replica"
SYSTEM_PROMPT = (
    "You are a patient tutor. Answer in one short sentence, and never use more words than the "
    "question needs. Prefer plain words to jargon."
)


@dataclass
class RayServer:
    proc: subprocess.Popen
    base_url: str
    log_path: Path
    address: str = ""  # the Ray cluster's GCS address

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def sdk(self) -> OpenAI:
        return OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=120)

    def async_sdk(self) -> AsyncOpenAI:
        return AsyncOpenAI(
            base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=120
        )


@pytest.fixture(scope="module")
def cluster(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServer]:
    """Two replicas with one thread each."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("ray") / "server.log"
    cmd = [sys.executable, "-m", "server", "--model", str(default_model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--replicas", "2", "--replica-cpus", "1", "--num-threads", "1",
           "--kv-cache-memory", "256MiB"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("KESTREL_") or k == "KESTREL_HOME"}
    env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "wb") as log:
        # A session of its own: Ctrl-C in pytest's terminal must not reach the cluster directly.
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    server = RayServer(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while (match := re.search(r"\(Ray cluster ([^)]+)\)", server.log())) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray server did not start:\n{server.log()[-6000:]}")
            time.sleep(0.5)
        server.address = match.group(1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the server's own session: it and its cluster
            proc.wait()


def chat(
    client: OpenAI, messages: list[dict[str, str]], max_tokens: int = 8
) -> tuple[str, str, int]:
    """(reply, replica that answered, prompt tokens served from the prefix cache)."""
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2-135m-instruct", messages=messages, max_tokens=max_tokens, temperature=0
    )
    completion = raw.parse()
    details = completion.usage.prompt_tokens_details
    return completion.choices[0].message.content, raw.headers[REPLICA_HEADER], details.cached_tokens


def test_concurrent_chats_all_succeed_on_both_replicas(cluster: RayServer) -> None:
    async def one(client: AsyncOpenAI, i: int) -> tuple[str, str]:
        raw = await client.chat.completions.with_raw_response.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": f"Name a number larger than {i}."}],
            max_tokens=8,
            temperature=0,
        )
        completion = raw.parse()
        return completion.choices[0].finish_reason, raw.headers[REPLICA_HEADER]

    async def run() -> list[tuple[str, str]]:
        async with cluster.async_sdk() as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(run())
    assert all(reason in ("stop", "length") for reason, _ in results), results
    replicas = [replica for _, replica in results]
    assert len(set(replicas)) == 2, replicas


def test_each_replicas_metrics_reach_rays_exporter(cluster: RayServer) -> None:
    """After the chats above, Ray's metrics endpoint shows each replica's request counter."""
    (url,) = re.findall(r"ray_kestrel_\*\{replica=\.\.\.\}: (\S+)", cluster.log())

    def replicas_counted() -> set[str]:
        text = httpx.get(url, timeout=30).text
        lines = [ln for ln in text.splitlines() if ln.startswith("ray_kestrel_http_requests_total{")]
        return {m.group(1) for ln in lines if (m := re.search(r'replica="([^"]+)"', ln))}

    wait_until(lambda: len(replicas_counted()) == 2, "both replicas' metrics in Ray's exporter",
               timeout=120)  # fmt: skip


def test_next_turn_lands_on_the_replica_of_the_first(cluster: RayServer) -> None:
    client = cluster.sdk()
    for topic in ("tides", "volcanoes", "bread"):
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"What causes {topic}? Keep it short, please."},
        ]
        reply, first, _ = chat(client, messages)
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Why?"}]
        _, second, cached_tokens = chat(client, messages)
        assert second == first, topic
        assert cached_tokens > 0, topic


def test_stream_is_relayed_as_sse(cluster: RayServer) -> None:
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    response = httpx.post(f"{cluster.base_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers[REPLICA_HEADER]
    assert len(response.headers.get_list("x-request-id")) == 1
    chunks = stream_json(parse_sse(response.content))
    assert chunks[-1]["usage"]["completion_tokens"] == 6


def test_bad_input_gets_the_single_servers_errors(cluster: RayServer) -> None:
    """test_errors.py's table, every case, through the Ray path."""
    with httpx.Client(base_url=cluster.base_url, timeout=120) as http:
        for name, method, path, body, status, type_, param, code in ERROR_CASES:
            response = http.request(
                method, path, content=body or None, headers={"Content-Type": "application/json"}
            )
            try:
                assert_error(response, status, type=type_, param=param, code=code)
            except AssertionError as exc:
                raise AssertionError(f"{name}: {exc}") from None


# Joins the cluster as a second driver, then kills the replica actor named on stdin. A local
# cluster has token authentication (the token in ~/.ray); a driver that joins by address uses
# it when RAY_AUTH_MODE says so from the start.
KILLER = """
import sys
import ray
ray.init(address=sys.argv[1], logging_level="WARNING", log_to_driver=False)
print("ready", flush=True)
ray.kill(ray.get_actor(sys.stdin.readline().strip(), namespace="serve"))
print("killed", flush=True)
"""


def test_killed_replica_ends_its_streams_and_others_serve(cluster: RayServer) -> None:
    from server.ray_serve import replica_actor_name

    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    killer = subprocess.Popen([sys.executable, "-c", KILLER, cluster.address], cwd=REPO_ROOT, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert killer.stdout.readline().strip() == "ready"
        body = {"model": "smollm2-135m-instruct", "stream": True, "max_tokens": 2000,
                "ignore_eos": True, "messages": [{"role": "user", "content": "Tell a long story."}]}  # fmt: skip
        events: list[str] = []
        url = f"{cluster.base_url}/v1/chat/completions"
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            assert response.status_code == 200
            victim = response.headers[REPLICA_HEADER]
            lines = response.iter_lines()
            for line in lines:  # the stream is under way
                if line.startswith("data: "):
                    events.append(line[len("data: ") :])
                    break
            killer.stdin.write(replica_actor_name(victim) + "\n")
            killer.stdin.flush()
            assert killer.stdout.readline().strip() == "killed"
            events += [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    finally:
        killer.stdin.close()
        killer.wait(60)
    assert events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    assert last["error"]["code"] == "replica_died", last
    assert len(events) < 2000  # ended by the kill, not by max_tokens

    client = cluster.sdk()
    served = [chat(client, [{"role": "user", "content": f"Say {i}."}], max_tokens=4)[1] for i in range(6)]
    assert victim not in served

    async def burst() -> set[str]:
        async with cluster.async_sdk() as client:
            results = await asyncio.gather(*(
                client.chat.completions.with_raw_response.create(
                    model="smollm2-135m-instruct", max_tokens=4,
                    messages=[{"role": "user", "content": f"Count to {i}."}])
                for i in range(8)
            ))  # fmt: skip
        return {raw.headers[REPLICA_HEADER] for raw in results}

    # Ray starts a replica in the killed one's place: two replicas answer again.
    wait_until(lambda: len(asyncio.run(burst()) - {victim}) == 2,
               "Ray to replace the killed replica", timeout=300)  # fmt: skip
