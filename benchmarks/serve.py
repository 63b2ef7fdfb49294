"""Serving benchmark: stream a fixed chat prompt set at OpenAI-compatible servers, report speed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from peer import (
    PEERS,
    ManagedServer,
    PeerError,
    PeerLaunch,
    PeerSetup,
    ServerStartError,
    free_port,
    kestrel_command,
    launched,
)

PROMPT_SET = Path(__file__).resolve().parent / "prompts_v1.json"
REPORT_VERSION = 1
DEFAULT_CONCURRENCY = "1,16,64"
UNBOUNDED_NUM_PROMPTS = 32  # Poisson mode without a concurrency cap
Conversation = list[dict[str, str]]


# ---------------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSet:
    name: str
    version: int
    sha256: str
    conversations: list[Conversation]


@dataclass(frozen=True)
class Level:
    """One benchmark run: `num_requests` requests, at most `concurrency` in flight (None: no cap),
    arriving as a Poisson process of `request_rate` req/s (inf: all at once)."""

    concurrency: int | None
    request_rate: float
    num_requests: int

    @property
    def label(self) -> str:
        cap = "c=inf" if self.concurrency is None else f"c={self.concurrency}"
        return cap if math.isinf(self.request_rate) else f"{cap} @{self.request_rate:g}/s"


@dataclass(frozen=True)
class Target:
    name: str
    base_url: str  # without /v1
    model: str  # what the server expects in the request's `model`
    api_key: str | None = None


@dataclass(frozen=True)
class Plan:
    """The identical workload every server gets."""

    prompts: PromptSet
    levels: list[Level]
    max_tokens: int
    seed: int
    num_warmup: int
    request_timeout: float
    startup_timeout: float
    ignore_eos: bool = False

    def sampling(self) -> dict[str, Any]:
        """Request fields besides the messages; ignore_eos (a vLLM extension) only when asked."""
        fields: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": 0.0}
        if self.ignore_eos:
            fields["ignore_eos"] = True
        return fields


def load_prompt_set(path: Path) -> PromptSet:
    raw = path.read_bytes()
    data = json.loads(raw)
    conversations = data["conversations"]
    if not conversations:
        raise ValueError(f"{path}: no conversations")
    return PromptSet(data["name"], data["version"], hashlib.sha256(raw).hexdigest(), conversations)


def make_levels(
    concurrencies: list[int | None], rate: float, num_prompts: list[int] | None
) -> list[Level]:
    """Default request count: 4 x concurrency (at least 8), so a single-stream run stays short.
    `num_prompts` holds one count for every level, or one per level."""

    def count(i: int, c: int | None) -> int:
        if num_prompts is not None:
            return num_prompts[i] if len(num_prompts) > 1 else num_prompts[0]
        return UNBOUNDED_NUM_PROMPTS if c is None else max(8, 4 * c)

    return [Level(c, rate, count(i, c)) for i, c in enumerate(concurrencies)]


def arrival_offsets(num_requests: int, rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request may be sent: a seeded Poisson process."""
    if math.isinf(rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(num_requests):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


# ---------------------------------------------------------------------------------------------
# One streamed request
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class RequestResult:
    error: str | None = None
    ttft: float | None = None  # seconds from send to the first content chunk
    e2e: float = 0.0  # seconds from send to the end of the stream
    itls: list[float] = field(default_factory=list)  # gaps between successive content chunks
    prompt_tokens: int | None = None
    output_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The data of each server-sent event, as soon as its terminating blank line arrives."""
    lines: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if lines:
                yield "\n".join(lines)
                lines = []
        elif line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
        # Comments (": ping") and other fields carry no data.
    if lines:
        yield "\n".join(lines)


def chat_body(target: Target, messages: Conversation, sampling: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": target.model,
        "messages": messages,
        **sampling,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


async def stream_chat(
    client: httpx.AsyncClient,
    target: Target,
    messages: Conversation,
    sampling: dict[str, Any],
    timeout: float,
) -> RequestResult:
    """Send one streaming chat completion; never raises, failures land in `error`."""
    result = RequestResult()
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            result.error = await _consume(
                client, target, chat_body(target, messages, sampling), headers, start, result
            )
    except TimeoutError:
        result.error = f"timed out after {timeout:g} s"
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except (ValueError, KeyError, TypeError) as exc:  # malformed JSON or chunk
        result.error = f"bad stream: {type(exc).__name__}: {exc}"
    result.e2e = time.perf_counter() - start
    return result


async def _consume(
    client: httpx.AsyncClient,
    target: Target,
    body: dict[str, Any],
    headers: dict[str, str],
    start: float,
    result: RequestResult,
) -> str | None:
    """Read the stream into `result`; return an error message or None."""
    url = f"{target.base_url}/v1/chat/completions"
    content_times: list[float] = []
    usage: dict[str, Any] | None = None
    is_finished = False
    async with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace").strip()
            return f"HTTP {response.status_code}: {text[:300]}"
        async for data in sse_data(response):
            now = time.perf_counter()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return f"in-stream error: {error_text(chunk['error'])[:300]}"
            for choice in chunk.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    content_times.append(now)
                is_finished = is_finished or choice.get("finish_reason") is not None
            usage = chunk.get("usage") or usage
    if content_times:
        result.ttft = content_times[0] - start
        result.itls = [b - a for a, b in itertools.pairwise(content_times)]
    if usage:
        result.prompt_tokens = usage.get("prompt_tokens")
        result.output_tokens = int(usage.get("completion_tokens") or 0)
    else:
        result.output_tokens = len(content_times)
    return None if is_finished else "stream ended without a finish_reason"


# ---------------------------------------------------------------------------------------------
# Running a level
# ---------------------------------------------------------------------------------------------


class Progress:
    """Requests done, on stderr: tqdm when importable, else a plain counter."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done = total, desc, 0
        try:
            from tqdm import tqdm

            tqdm.monitor_interval = 0  # no monitor thread: servers are forked after this
            self._bar: Any = tqdm(
                total=total, desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True
            )
        except ImportError:
            self._bar = None
            self._print()

    def update(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        else:
            self._print()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            print(file=sys.stderr, flush=True)

    def _print(self) -> None:
        print(
            f"\r{self.desc}: {self.done}/{self.total} requests", end="", file=sys.stderr, flush=True
        )


def make_client(max_connections: int | None, timeout: float) -> httpx.AsyncClient:
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    # trust_env=False: loopback targets must not go through a proxy from the environment.
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=10.0), limits=limits, trust_env=False
    )


async def run_level(target: Target, plan: Plan, level: Level) -> dict[str, Any]:
    offsets = arrival_offsets(level.num_requests, level.request_rate, plan.seed)
    semaphore = asyncio.Semaphore(level.concurrency or level.num_requests)
    conversations = plan.prompts.conversations
    progress = Progress(level.num_requests, f"{target.name} {level.label}")

    async def one(client: httpx.AsyncClient, start: float, i: int) -> RequestResult:
        await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
        async with semaphore:
            messages = conversations[i % len(conversations)]
            result = await stream_chat(
                client, target, messages, plan.sampling(), plan.request_timeout
            )
        progress.update()
        return result

    try:
        async with make_client(level.concurrency, plan.request_timeout) as client:
            start = time.perf_counter()
            results = await asyncio.gather(
                *(one(client, start, i) for i in range(level.num_requests))
            )
            duration = time.perf_counter() - start
    finally:
        progress.close()
    return summarize(level, results, duration)


async def warm_up(target: Target, plan: Plan) -> str | None:
    """Unmeasured requests first, one at a time. First-time costs are large: transformers'
    continuous batching initialises itself on its first request (from that request's generation
    config, hence the run's own max_tokens), and first calls of new shapes are slow."""
    conversations = plan.prompts.conversations
    async with make_client(1, plan.startup_timeout) as client:
        for i in range(plan.num_warmup):
            messages = conversations[i % len(conversations)]
            result = await stream_chat(
                client, target, messages, plan.sampling(), plan.startup_timeout
            )
            if result.error:
                return result.error
    return None


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linearly interpolated between closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Sequence[float], scale: float) -> dict[str, float | None]:
    def scaled(v: float | None) -> float | None:
        return None if v is None else round(v * scale, 3)

    mean = sum(values) / len(values) if values else None
    return {"mean": scaled(mean), **{f"p{q}": scaled(percentile(values, q)) for q in (50, 90, 99)}}


def summarize(level: Level, results: Sequence[RequestResult], duration: float) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in done)
    # Time per output token after the first, per request: insensitive to how chunks are grouped.
    tpots = [
        (r.e2e - r.ttft) / (r.output_tokens - 1)
        for r in done
        if r.ttft is not None and r.output_tokens > 1
    ]
    return {
        "label": level.label,
        "concurrency": level.concurrency,
        "request_rate": None if math.isinf(level.request_rate) else level.request_rate,
        "num_requests": level.num_requests,
        "completed": len(done),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "duration_s": round(duration, 3),
        "request_throughput": _rate(len(done), duration),
        "output_throughput": _rate(output_tokens, duration),
        "total_throughput": _rate(prompt_tokens + output_tokens, duration),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "ttft_ms": distribution([r.ttft for r in done if r.ttft is not None], 1000),
        "itl_ms": distribution([gap for r in done for gap in r.itls], 1000),
        "tpot_ms": distribution(tpots, 1000),
        "e2e_s": distribution([r.e2e for r in done], 1),
    }


def _rate(count: float, duration: float) -> float:
    return round(count / duration, 3) if duration > 0 else 0.0


# (row label, key path, digits) for the per-server table.
TABLE_ROWS: list[tuple[str, tuple[str, ...], int]] = [
    ("completed", ("completed",), 0),
    ("errors", ("errors",), 0),
    ("duration (s)", ("duration_s",), 2),
    ("request/s", ("request_throughput",), 2),
    ("output tok/s", ("output_throughput",), 1),
    ("total tok/s", ("total_throughput",), 1),
    ("TTFT p50 (ms)", ("ttft_ms", "p50"), 1),
    ("TTFT p90 (ms)", ("ttft_ms", "p90"), 1),
    ("TTFT p99 (ms)", ("ttft_ms", "p99"), 1),
    ("ITL p50 (ms)", ("itl_ms", "p50"), 1),
    ("ITL p90 (ms)", ("itl_ms", "p90"), 1),
    ("ITL p99 (ms)", ("itl_ms", "p99"), 1),
    ("TPOT p50 (ms)", ("tpot_ms", "p50"), 1),
    ("E2E p50 (s)", ("e2e_s", "p50"), 2),
    ("E2E p99 (s)", ("e2e_s", "p99"), 2),
]
# (row label, key path, higher is better) for the Kestrel / peer table.
RATIO_ROWS: list[tuple[str, tuple[str, ...], bool]] = [
    ("output tok/s", ("output_throughput",), True),
    ("total tok/s", ("total_throughput",), True),
    ("request/s", ("request_throughput",), True),
    ("TTFT p50", ("ttft_ms", "p50"), False),
    ("TTFT p99", ("ttft_ms", "p99"), False),
    ("ITL p50", ("itl_ms", "p50"), False),
    ("ITL p99", ("itl_ms", "p99"), False),
    ("TPOT p50", ("tpot_ms", "p50"), False),
    ("E2E p50", ("e2e_s", "p50"), False),
]


def lookup(figures: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        figures = figures.get(key) if isinstance(figures, dict) else None
    return figures


def ratios(ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for label, path, _ in RATIO_ROWS:
        a, b = lookup(ours, path), lookup(peer, path)
        out[label] = round(a / b, 3) if a is not None and b else None
    return out


def format_table(header: str, columns: list[str], rows: list[tuple[str, list[str]]]) -> str:
    width0 = max(len(header), *(len(label) for label, _ in rows))
    widths = [max(len(col), *(len(cells[i]) for _, cells in rows)) for i, col in enumerate(columns)]
    lines = [header.ljust(width0) + "".join(f"  {c:>{w}}" for c, w in zip(columns, widths))]
    for label, cells in rows:
        lines.append(label.ljust(width0) + "".join(f"  {c:>{w}}" for c, w in zip(cells, widths)))
    return "\n".join(lines)


def fmt(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if digits else str(value)


def server_table(server: dict[str, Any]) -> str:
    title = f"== {server['name']}  {server['url']}  model={server['model'] or '?'} =="
    if server.get("start_error"):
        return f"{title}\nfailed to start: {server['start_error']}"
    levels = server["levels"]
    rows = [(label, [fmt(lookup(lv, path), d) for lv in levels]) for label, path, d in TABLE_ROWS]
    lines = [title, *(f"  {line}" for line in server.get("settings", ()))]
    lines.append(format_table("", [lv["label"] for lv in levels], rows))
    loads = "  ".join(
        f"{lv['label']} {lv['loadavg_1m'][0]:.1f}->{lv['loadavg_1m'][1]:.1f}" for lv in levels
    )
    lines.append(f"load average (1 min, whole machine) before->after: {loads}")
    if server["warmup_error"]:
        lines.append(f"warm-up failed: {server['warmup_error']}")
    lines += [
        f"{lv['label']}: {lv['errors']} errors, first: {lv['first_error']}"
        for lv in levels
        if lv["errors"]
    ]
    if server.get("exit_code") is not None:
        lines.append(
            f"server exited during the run with code {server['exit_code']} (log: {server['log']})"
        )
    return "\n".join(lines)


def ratio_table(ours: dict[str, Any], peer: dict[str, Any], table: list[dict[str, Any]]) -> str:
    title = f"== {ours['name']} / {peer['name']} =="
    rows = []
    for label, _, higher_better in RATIO_ROWS:
        cells = [
            fmt(entry["ratios"][label], 2) + ("x" if entry["ratios"][label] is not None else "")
            for entry in table
        ]
        rows.append((f"{label} ({'higher' if higher_better else 'lower'} is better)", cells))
    text = f"{title}\n{format_table('', [entry['label'] for entry in table], rows)}"
    for entry in table:
        if entry.get("round_ratios"):
            rounds = [r for r in entry["round_ratios"] if r is not None]
            text += (
                f"\n{entry['label']}: output tok/s ratio by round "
                + " ".join(f"{r:.2f}" for r in rounds)
                + f" (median {sorted(rounds)[(len(rounds) - 1) // 2]:.2f}; the table shows each"
                " server's median round)"
            )
    return text


# ---------------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------------


def served_model(base_url: str, api_key: str | None) -> str:
    """The first model a server lists at /v1/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30.0, trust_env=False)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def normalize_url(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")


def prepare_peer(args: argparse.Namespace, plan: Plan) -> PeerLaunch:
    """Resolve the peer's model and settings before anything starts, so a missing model or build
    fails the run at once."""
    in_flight = [level.concurrency or level.num_requests for level in plan.levels]
    setup = PeerSetup(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_concurrency=max(in_flight),
        max_tokens=plan.max_tokens,
        conversations=plan.prompts.conversations,
        extra=shlex.split(args.peer_args),
    )
    try:
        return PEERS[args.peer](setup)
    except PeerError as exc:
        raise SystemExit(f"--peer {args.peer}: {exc}") from None


def benchmark_target(
    target: Target, plan: Plan, server: ManagedServer | None = None
) -> dict[str, Any]:
    """Warm up, then run every level in order against one server."""
    report: dict[str, Any] = {"name": target.name, "url": target.base_url, "model": target.model}
    if server is not None:
        report.update(command=shlex.join(server.command), log=str(server.log_path))
    report["warmup_error"] = asyncio.run(warm_up(target, plan))
    report["levels"] = [measure_level(target, plan, level) for level in plan.levels]
    if server is not None:
        report["exit_code"] = server.exit_code()  # not None: it died during the run
    return report


def measure_level(target: Target, plan: Plan, level: Level) -> dict[str, Any]:
    """One level's figures, with the 1-minute load average around it: the machine may be shared."""
    before = os.getloadavg()[0]
    figures = asyncio.run(run_level(target, plan, level))
    figures["loadavg_1m"] = [round(before, 2), round(os.getloadavg()[0], 2)]
    return figures


def launch_and_benchmark(
    name: str,
    command: list[str],
    port: int,
    plan: Plan,
    log_dir: Path,
    *,
    model: str | None,
    api_key: str | None = None,
    settings: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Start a server, benchmark it, stop it; `model=None` asks the server which model it serves.
    `settings` (what makes the comparison fair) are printed and go into the report."""
    url = f"http://127.0.0.1:{port}"
    print(f"starting {name}: {shlex.join(command)}", file=sys.stderr, flush=True)
    for line in settings:
        print(f"  {line}", file=sys.stderr, flush=True)
    try:
        with launched(name, command, port, log_dir, plan.startup_timeout) as server:
            target = Target(name, url, model or served_model(url, api_key), api_key)
            report = benchmark_target(target, plan, server)
    except (ServerStartError, httpx.HTTPError) as exc:
        print(f"{name}: {exc}", file=sys.stderr, flush=True)
        report = {
            "name": name,
            "url": url,
            "model": model,
            "levels": [],
            "start_error": first_and_last_line(str(exc)),
            "command": shlex.join(command),
            "log": str(log_dir / f"{name}-{port}.log"),
        }
    if settings:
        report["settings"] = list(settings)
    return report


@dataclass(frozen=True)
class Launch:
    """A server for launch_pair_and_benchmark: `model` None asks it which model it serves;
    `settings` (what makes the comparison fair) are printed and go into the report."""

    name: str
    command: list[str]
    port: int
    model: str | None
    api_key: str | None = None
    settings: tuple[str, ...] = ()


def launch_pair_and_benchmark(
    launches: list[Launch], plan: Plan, log_dir: Path, rounds: int
) -> list[dict[str, Any]]:
    """--rounds: both servers up at once, every level run `rounds` times, alternating between
    them, so that a shared machine's drift over the run falls on both alike. Each server's level
    figures are those of its median round (by output tok/s); every round's output tok/s is kept."""
    reports: list[dict[str, Any]] = []
    targets: list[Target] = []
    servers: list[ManagedServer] = []
    with contextlib.ExitStack() as stack:
        for launch in launches:
            print(f"starting {launch.name}: {shlex.join(launch.command)}", file=sys.stderr, flush=True)
            for line in launch.settings:
                print(f"  {line}", file=sys.stderr, flush=True)
            url = f"http://127.0.0.1:{launch.port}"
            try:
                server = stack.enter_context(
                    launched(launch.name, launch.command, launch.port, log_dir, plan.startup_timeout)
                )
                target = Target(launch.name, url, launch.model or served_model(url, launch.api_key), launch.api_key)
            except (ServerStartError, httpx.HTTPError) as exc:
                raise SystemExit(f"{launch.name}: {first_and_last_line(str(exc))}") from None
            report: dict[str, Any] = {
                "name": launch.name,
                "url": url,
                "model": target.model,
                "command": shlex.join(launch.command),
                "log": str(server.log_path),
                "warmup_error": asyncio.run(warm_up(target, plan)),
                "levels": [],
            }
            if launch.settings:
                report["settings"] = list(launch.settings)
            reports.append(report)
            targets.append(target)
            servers.append(server)
        for level in plan.levels:
            runs = [[measure_level(target, plan, level) for target in targets] for _ in range(rounds)]
            for i, report in enumerate(reports):
                mine = sorted((run[i] for run in runs), key=lambda f: f["output_throughput"] or 0.0)
                chosen = dict(mine[(len(mine) - 1) // 2])
                chosen["rounds_output_throughput"] = [run[i]["output_throughput"] for run in runs]
                report["levels"].append(chosen)
        for report, server in zip(reports, servers):
            report["exit_code"] = server.exit_code()  # not None: it died during the run
    return reports


def round_ratios(ours: dict[str, Any], peer: dict[str, Any]) -> list[float] | None:
    """Output tok/s of Kestrel over the peer's, round by round (--rounds)."""
    a, b = ours.get("rounds_output_throughput"), peer.get("rounds_output_throughput")
    if not a or not b:
        return None
    return [round(x / y, 3) if x and y else None for x, y in zip(a, b)]


def first_and_last_line(text: str) -> str:
    """`text` on one line: its first line and, for a log tail, its last (usually the error)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ... ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else "".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Benchmark the target (a URL, or Kestrel launched on --model), then the peer, one at a time."""
    prompts = load_prompt_set(args.prompts)
    levels = make_levels(args.concurrency, args.request_rate, args.num_prompts)
    plan = Plan(
        prompts,
        levels,
        args.max_tokens,
        args.seed,
        args.num_warmup,
        args.request_timeout,
        args.startup_timeout,
        args.ignore_eos,
    )
    peer = prepare_peer(args, plan) if args.peer else None
    target = url_target(args) if args.url else None
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="kestrel-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    if peer is not None and target is None and args.rounds > 1:
        ours_port, peer_port = free_port(), free_port()
        command = kestrel_command(
            args.model, ours_port, dtype=args.dtype, device=args.device, extra=shlex.split(args.server_args)
        )
        servers = launch_pair_and_benchmark(
            [
                Launch(args.name, command, ours_port, args.served_model, args.api_key),
                Launch(args.peer, peer.command(peer_port), peer_port, peer.model, settings=peer.settings),
            ],
            plan,
            log_dir,
            args.rounds,
        )
        peer = None  # measured
    elif target is not None:
        servers = [benchmark_target(target, plan)]
    else:
        port = free_port()
        extra = shlex.split(args.server_args)
        command = kestrel_command(
            args.model, port, dtype=args.dtype, device=args.device, extra=extra
        )
        servers = [
            launch_and_benchmark(
                args.name,
                command,
                port,
                plan,
                log_dir,
                model=args.served_model,
                api_key=args.api_key,
            )
        ]
    if peer is not None:
        port = free_port()
        servers.append(
            launch_and_benchmark(
                args.peer,
                peer.command(port),
                port,
                plan,
                log_dir,
                model=peer.model,
                settings=peer.settings,
            )
        )
    is_empty = not any(log_dir.iterdir())  # nothing launched (--url)
    if not args.log_dir and (is_empty or not any(has_trouble(server) for server in servers)):
        shutil.rmtree(log_dir, ignore_errors=True)
        for server in servers:
            server.pop("log", None)
    return build_report(args, prompts, servers)


def url_target(args: argparse.Namespace) -> Target:
    url = normalize_url(args.url)
    try:
        model = args.served_model or served_model(url, args.api_key)
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise SystemExit(f"cannot list the models of {url} ({exc}); pass --served-model") from None
    return Target(args.name, url, model, args.api_key)


def has_trouble(server: dict[str, Any]) -> bool:
    """Whether a server's log is worth keeping: it failed to start, died, or answered errors."""
    return bool(
        server.get("start_error")
        or server.get("warmup_error")
        or server.get("exit_code") is not None
        or any(level["errors"] for level in server["levels"])
    )


def build_report(
    args: argparse.Namespace, prompts: PromptSet, servers: list[dict[str, Any]]
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "version": REPORT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "prompt_set": {
            "name": prompts.name,
            "version": prompts.version,
            "sha256": prompts.sha256,
            "num_conversations": len(prompts.conversations),
        },
        "config": {
            "max_tokens": args.max_tokens,
            "ignore_eos": args.ignore_eos,
            "seed": args.seed,
            "request_rate": _json_rate(args.request_rate),
            "concurrency": args.concurrency,
            "num_prompts": args.num_prompts,
            "dtype": args.dtype,
            "device": args.device,
            "temperature": 0.0,
            "num_warmup": args.num_warmup,
        },
        "servers": servers,
    }
    if len(servers) == 2 and servers[0]["levels"] and servers[1]["levels"]:
        ours, peer = servers
        report["ratios"] = {
            "numerator": ours["name"],
            "denominator": peer["name"],
            "levels": [
                {"label": a["label"], "ratios": ratios(a, b), "round_ratios": round_ratios(a, b)}
                for a, b in zip(ours["levels"], peer["levels"])
            ],
        }
    return report


def _json_rate(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def print_report(report: dict[str, Any]) -> None:
    print(
        f"\nprompt set {report['prompt_set']['name']} ({report['prompt_set']['num_conversations']} "
        f"conversations), max_tokens={report['config']['max_tokens']}, temperature 0, "
        f"request rate {report['config']['request_rate']}"
    )
    for server in report["servers"]:
        print("\n" + server_table(server))
    if "ratios" in report:
        ours, peer = report["servers"]
        print("\n" + ratio_table(ours, peer, report["ratios"]["levels"]))
    logs = [server["log"] for server in report["servers"] if server.get("log")]
    if logs:
        print("\nserver logs: " + "  ".join(logs))
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parse_concurrency(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be >= 1")
    return values


def parse_num_prompts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("--num-prompts counts must be >= 1")
    return values


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--url", help="an OpenAI-compatible server to benchmark, e.g. http://127.0.0.1:8000"
    )
    p.add_argument(
        "--model",
        help="catalogue name, Hugging Face directory or .gguf file: without --url, start "
        "Kestrel on it; with --peer, the peer serves it too (llama.cpp: its GGUF)",
    )
    p.add_argument(
        "--served-model", help="the request's `model` field (default: the first of /v1/models)"
    )
    p.add_argument(
        "--name", default="kestrel", help="label of the benchmarked server (default: kestrel)"
    )
    p.add_argument("--api-key", help="Bearer token for the benchmarked server (not the peer)")
    p.add_argument(
        "--concurrency",
        type=parse_concurrency,
        help=f"comma-separated in-flight limits (default: {DEFAULT_CONCURRENCY}; with a finite "
        "--request-rate: no limit)",
    )
    p.add_argument(
        "--request-rate",
        type=positive_float,
        default=math.inf,
        help="Poisson arrivals in requests/s (default: inf, all at once)",
    )
    p.add_argument(
        "--num-prompts",
        type=parse_num_prompts,
        help="requests per level, or one count per --concurrency level separated by commas "
        f"(default: max(8, 4 x concurrency); {UNBOUNDED_NUM_PROMPTS} without a limit)",
    )
    p.add_argument(
        "--max-tokens", type=int, default=128, help="max_tokens of every request (default: 128)"
    )
    p.add_argument(
        "--ignore-eos", action="store_true",
        help="send ignore_eos (vLLM's extension) so every request generates max_tokens tokens",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals (default: 0)")
    p.add_argument(
        "--json", metavar="PATH", help="write the report as JSON to PATH ('-': stdout, last)"
    )
    p.add_argument(
        "--peer", choices=sorted(PEERS), help="also launch this server on --model and compare"
    )
    p.add_argument(
        "--dtype", default="bfloat16", help="dtype of launched servers (default: bfloat16)"
    )
    p.add_argument("--device", default="cpu", help="device of launched servers (default: cpu)")
    p.add_argument(
        "--server-args", default="", help="extra flags for the launched Kestrel, one string"
    )
    p.add_argument("--peer-args", default="", help="extra flags for the peer, one string")
    p.add_argument(
        "--rounds", type=int, default=1,
        help="with --peer: keep both servers up and run each level this many times, alternating"
        " between them; each server reports its median round (default: 1, one after the other)",
    )
    p.add_argument(
        "--num-warmup",
        type=int,
        default=4,
        help="unmeasured requests per server, one at a time, from the start of the prompt set "
        "(default: 4, which includes a long document)",
    )
    p.add_argument(
        "--startup-timeout", type=float, default=600.0, help="seconds to wait for /health"
    )
    p.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds allowed per request"
    )
    p.add_argument(
        "--log-dir",
        help="keep the launched servers' logs here (default: a temporary directory, "
        "deleted at the end unless something failed)",
    )
    p.add_argument("--prompts", type=Path, default=PROMPT_SET, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.url and not args.model:
        p.error("give --url or --model")
    if args.peer and not args.model:
        p.error("--peer needs --model (the model both servers load)")
    if args.concurrency is None:
        args.concurrency = (
            parse_concurrency(DEFAULT_CONCURRENCY) if math.isinf(args.request_rate) else [None]
        )
    if args.num_prompts is not None and len(args.num_prompts) not in (1, len(args.concurrency)):
        p.error("--num-prompts takes one count, or one per --concurrency level")
    return args


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so launched servers are stopped on the way out."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with sigterm_as_interrupt():
            report = run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130
    print_report(report)
    if args.json == "-":
        print(json.dumps(report))
    elif args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 1 if any(s.get("start_error") for s in report["servers"]) else 0


if __name__ == "__main__":
    sys.exit(main())
