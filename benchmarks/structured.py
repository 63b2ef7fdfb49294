"""What structured outputs cost (issue 13): throughput of constrained vs unconstrained streams, and
the time to first token with no grammar, a cached grammar and a fresh one.

    .venv/bin/python benchmarks/structured.py                                  # SmolLM2, started here
    .venv/bin/python benchmarks/structured.py --model qwen2.5-coder-0.5b-instruct
    .venv/bin/python benchmarks/structured.py --url http://127.0.0.1:8000      # a running server

Throughput: `--streams` closed-loop streams (default 16) of chat requests, `--requests` in all,
greedy, `--max-tokens` each. The constrained runs send `response_format` json_schema (strict) with
a schema whose instances are longer than max_tokens (an object holding an array of at least 64
strings), and the unconstrained runs `ignore_eos`, so every request of both kinds decodes exactly
max_tokens tokens and the runs differ only in the grammar. The two kinds alternate for `--rounds`
rounds, so a noisy neighbour weighs on both; the figure is output tok/s, summed over rounds.

TTFT: one request at a time, `--ttft-requests` rounds of three requests with max_tokens 1 and the
same short prompt: no grammar; the schema above (compiled and cached before the first round); and
a schema never seen before (a fresh property name each time, so the server compiles it). Medians.
Schema compile time on its own, per engine and vocabulary: benchmarks/grammar_engines.py.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from peer import free_port, kestrel_command, launched
from serve import RequestResult, Target, make_client, served_model, stream_chat

LIST_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "steps": {"type": "array", "items": {"type": "string"}, "minItems": 64},
    },
    "required": ["title", "steps"],
    "additionalProperties": False,
}
THROUGHPUT_PROMPTS = [
    "Write a checklist for moving house, as JSON.",
    "List the steps to bake sourdough bread, as JSON.",
    "Give a packing list for a week of hiking, as JSON.",
    "List things to check before a long car trip, as JSON.",
]
TTFT_PROMPT = "Describe a cat as JSON."


def json_schema_format(schema: dict[str, Any], name: str = "answer") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def fresh_schema() -> dict[str, Any]:
    """A schema no server has compiled yet: a property name of its own."""
    field = f"field_{uuid.uuid4().hex[:12]}"
    return {
        "type": "object",
        "properties": {field: {"type": "string"}, "age": {"type": "integer"}},
        "required": [field, "age"],
    }


async def closed_loop(
    target: Target, streams: int, requests: int, sampling: dict[str, Any], timeout: float
) -> tuple[list[RequestResult], float]:
    queue = list(range(requests))

    async def worker(client: Any) -> list[RequestResult]:
        done = []
        while queue:
            i = queue.pop()
            messages = [{"role": "user", "content": THROUGHPUT_PROMPTS[i % len(THROUGHPUT_PROMPTS)]}]
            done.append(await stream_chat(client, target, messages, sampling, timeout))
        return done

    async with make_client(streams, timeout) as client:
        start = time.perf_counter()
        per_worker = await asyncio.gather(*(worker(client) for _ in range(streams)))
        duration = time.perf_counter() - start
    return [r for results in per_worker for r in results], duration


def check(results: list[RequestResult], max_tokens: int, kind: str) -> None:
    errors = [r.error for r in results if not r.ok]
    if errors:
        raise SystemExit(f"{kind}: {len(errors)} requests failed, first: {errors[0]}")
    short = [r.output_tokens for r in results if r.output_tokens != max_tokens]
    if short:
        print(f"  note: {kind}: {len(short)} requests stopped before max_tokens: {short[:8]}")


def throughput(target: Target, args: argparse.Namespace) -> None:
    base = {"max_tokens": args.max_tokens, "temperature": 0.0}
    kinds = {
        "unconstrained": {**base, "ignore_eos": True},
        "constrained": {**base, "response_format": json_schema_format(LIST_SCHEMA, "checklist")},
    }
    # Warm-up: compile the schema and touch every batch shape once.
    for sampling in kinds.values():
        asyncio.run(closed_loop(target, args.streams, args.streams, sampling, args.timeout))
    totals = {kind: [0, 0.0] for kind in kinds}
    for round_index in range(args.rounds):
        for kind, sampling in kinds.items():
            results, duration = asyncio.run(
                closed_loop(target, args.streams, args.requests, sampling, args.timeout)
            )
            check(results, args.max_tokens, kind)
            tokens = sum(r.output_tokens for r in results)
            totals[kind][0] += tokens
            totals[kind][1] += duration
            print(f"  round {round_index + 1} {kind:<13} {tokens / duration:7.1f} output tok/s")
    rates = {kind: tokens / seconds for kind, (tokens, seconds) in totals.items()}
    ratio = rates["constrained"] / rates["unconstrained"]
    print(
        f"{args.streams} streams x {args.max_tokens} tokens: unconstrained "
        f"{rates['unconstrained']:.1f} tok/s, constrained {rates['constrained']:.1f} tok/s, "
        f"ratio {ratio:.3f} ({(1 - ratio) * 100:+.1f}% slower; target <= 5%)"
    )


def time_to_first_token(target: Target, args: argparse.Namespace) -> None:
    messages = [{"role": "user", "content": TTFT_PROMPT}]
    base = {"max_tokens": 1, "temperature": 0.0}
    cached = {**base, "response_format": json_schema_format(LIST_SCHEMA, "checklist")}

    def one(sampling: dict[str, Any]) -> float:
        async def go() -> RequestResult:
            async with make_client(1, args.timeout) as client:
                return await stream_chat(client, target, messages, sampling, args.timeout)

        result = asyncio.run(go())
        if not result.ok or result.ttft is None:
            raise SystemExit(f"TTFT request failed: {result.error}")
        return result.ttft

    one(base)
    one(cached)  # compiles and caches the schema
    ttfts: dict[str, list[float]] = {"no grammar": [], "cached grammar": [], "fresh grammar": []}
    for _ in range(args.ttft_requests):
        ttfts["no grammar"].append(one(base))
        ttfts["cached grammar"].append(one(cached))
        fresh = {**base, "response_format": json_schema_format(fresh_schema())}
        ttfts["fresh grammar"].append(one(fresh))
    medians = {kind: statistics.median(values) * 1000 for kind, values in ttfts.items()}
    baseline = medians["no grammar"]
    for kind, median in medians.items():
        print(f"  TTFT p50 {kind:<15} {median:7.1f} ms ({median - baseline:+.1f} ms)")
    print(
        f"cached grammar adds {medians['cached grammar'] - baseline:+.1f} ms to TTFT "
        f"(target <= +50 ms); a fresh one {medians['fresh grammar'] - baseline:+.1f} ms"
    )


def run(target: Target, args: argparse.Namespace) -> None:
    print(f"{target.name}: model {target.model}")
    throughput(target, args)
    time_to_first_token(target, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server; default: start Kestrel")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48, help="requests per round and kind")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ttft-requests", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("server_args", nargs="*", help="extra flags for the started server (after --)")
    args = parser.parse_args()
    if args.url:
        run(Target("server", args.url.rstrip("/"), served_model(args.url.rstrip("/"), None)), args)
        return
    port = free_port()
    command = kestrel_command(args.model, port, dtype="bfloat16", device="cpu", extra=args.server_args)
    with tempfile.TemporaryDirectory() as log_dir, launched("kestrel", command, port, Path(log_dir), 900) as server:
        run(Target("kestrel", server.base_url, served_model(server.base_url, None)), args)


if __name__ == "__main__":
    sys.exit(main())
