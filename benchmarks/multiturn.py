"""Multi-turn chat: time to first token of each turn, with and without prefix caching.

    python benchmarks/multiturn.py --model smollm2-135m-instruct --turns 6 --repeats 3
    python benchmarks/multiturn.py --ray-replicas 2 --chats 8 --turns 6   # affinity on vs off
    python benchmarks/multiturn.py --url http://127.0.0.1:8000 --chats 8  # any running server

A conversation (one of the prompt set's long documents to summarise, then follow-up requests)
is played turn by turn through the engine. Each turn's prompt holds the whole history, as a
chat client sends it, so without a prefix cache every turn recomputes all earlier ones. Two
engines in one process, one with prefix caching and one without, take turns (the host's speed
drifts); each repeat opens with a different first line, so nothing carries over from the last
repeat but the chat template's system prompt.

With --url or --ray-replicas, several such chats (each on its own document) run at once against
a server, over HTTP with streaming. Per turn: prompt tokens, cached tokens (usage), time to the
first content chunk and the replica that answered (x-kestrel-replica). --ray-replicas N starts
`python -m server --replicas N` (one thread per replica) twice, with `--routing prefix` (prefix
affinity) and `--routing pow2` (Ray's power of two choices), and compares the prefix-cache hit
rate and TTFT of the later turns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import CacheConfig, LLMEngine, SamplingParams  # noqa: E402
from engine.config import EngineConfig  # noqa: E402

PROMPTS = Path(__file__).with_name("prompts_v1.json")
FOLLOW_UPS = [
    "Which of those points matters most, and why?",
    "Rewrite the summary for a ten-year-old.",
    "Give the article a short title.",
    "List three questions the article leaves open.",
    "Now summarise it in one sentence.",
    "Translate that sentence into French.",
    "Thank you. What should I read next on this topic?",
]


def first_message(repeat: int) -> str:
    conversations = json.loads(PROMPTS.read_text())["conversations"]
    document = conversations[3][0]["content"]  # a long document to summarise
    return f"Conversation {repeat + 1}.\n{document}"


def play(engine: LLMEngine, repeat: int, turns: int, max_tokens: int) -> list[dict]:
    """One conversation; per turn: prompt tokens, tokens found cached, seconds to the first token."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    chat = [{"role": "user", "content": first_message(repeat)}]
    rows = []
    for turn in range(turns):
        prompt = engine.tokenizer.encode_chat(chat)
        request_id = f"r{repeat}-t{turn}"
        start = time.perf_counter()
        engine.add_request(request_id, prompt, params)
        first_token, text, cached = None, "", 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                if first_token is None and output.outputs[0].token_ids:
                    first_token = time.perf_counter() - start
                text += output.outputs[0].text
                cached = output.num_cached_tokens
        rows.append({"prompt_tokens": len(prompt), "cached_tokens": cached, "ttft_s": first_token})
        chat += [{"role": "assistant", "content": text}, {"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]}]
    return rows


async def play_http(client, url: str, model: str, chat_index: int, turns: int, max_tokens: int) -> list[dict]:
    """One conversation against a server; per turn: prompt and cached tokens, TTFT, replica."""
    chat = [{"role": "user", "content": first_message(chat_index)}]
    rows = []
    for turn in range(turns):
        body = {"model": model, "messages": chat, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        start = time.perf_counter()
        first_token, text, usage = None, "", {}
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            replica = response.headers.get("x-kestrel-replica", "")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        if first_token is None:
                            first_token = time.perf_counter() - start
                        text += choice["delta"]["content"]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        rows.append({"prompt_tokens": usage.get("prompt_tokens", 0), "cached_tokens": cached,
                     "ttft_s": first_token, "replica": replica})  # fmt: skip
        chat += [{"role": "assistant", "content": text}, {"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]}]
    return rows


async def play_chats(url: str, model: str, chats: int, turns: int, max_tokens: int) -> list[list[dict]]:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        return await asyncio.gather(*(play_http(client, url, model, i, turns, max_tokens) for i in range(chats)))


def summarize(name: str, runs: list[list[dict]]) -> dict:
    """Later turns (2..n): prefix-cache hit rate, share answered by the previous turn's replica, TTFT."""
    later = [row for rows in runs for row in rows[1:]]
    same = [rows[t]["replica"] == rows[t - 1]["replica"] for rows in runs for t in range(1, len(rows))]
    first = [rows[0]["ttft_s"] for rows in runs if rows and rows[0]["ttft_s"] is not None]
    ttfts = sorted(row["ttft_s"] for row in later if row["ttft_s"] is not None)
    summary = {
        "routing": name,
        "hit_rate": sum(r["cached_tokens"] for r in later) / max(1, sum(r["prompt_tokens"] for r in later)),
        "same_replica": sum(same) / max(1, len(same)),
        "ttft_first_median_s": statistics.median(first) if first else None,
        "ttft_later_median_s": statistics.median(ttfts) if ttfts else None,
        "ttft_later_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))] if ttfts else None,
        "replicas": sorted({row["replica"] for rows in runs for row in rows}),
    }
    print(f"{name:>8}: later turns {len(later)}, prefix-cache hit rate {summary['hit_rate']:.1%}, "
          f"same replica as the previous turn {summary['same_replica']:.0%}, TTFT first turn median "
          f"{summary['ttft_first_median_s'] * 1e3:.0f} ms, later turns median "
          f"{summary['ttft_later_median_s'] * 1e3:.0f} ms / p90 {summary['ttft_later_p90_s'] * 1e3:.0f} ms", flush=True)  # fmt: skip
    return summary


def start_ray_server(model: str, replicas: int, routing: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "server", "--model", model, "--port", str(port), "--replicas", str(replicas),
           "--routing", routing, "--replica-cpus", "1", "--num-threads", "1", "--kv-cache-memory", "512MiB",
           "--no-access-log"]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 900
    while not re.search(r"kestrel: serving", log_path.read_text(errors="replace")):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start; see {log_path}")
        time.sleep(1)
    return proc, f"http://127.0.0.1:{port}"


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main_http(args: argparse.Namespace) -> None:
    results = []
    if args.url:
        runs = asyncio.run(play_chats(args.url, args.model, args.chats, args.turns, args.max_tokens))
        results.append({**summarize("server", runs), "runs": runs})
    else:
        for routing in ("prefix", "pow2"):
            log_path = Path(f"/tmp/kestrel-multiturn-{routing}.log")
            proc, url = start_ray_server(args.model, args.ray_replicas, routing, log_path)
            try:
                asyncio.run(play_chats(url, args.model, 2, 1, 4))  # warm-up: each replica's kernels
                runs = asyncio.run(play_chats(url, args.model, args.chats, args.turns, args.max_tokens))
            finally:
                stop_server(proc)
            results.append({**summarize(routing, runs), "runs": runs})
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "chats": args.chats, "turns": args.turns,
                                         "results": results}, indent=2))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64, help="answer length cap per turn")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--url", help="play --chats concurrent chats against this server")
    parser.add_argument("--ray-replicas", type=int, help="start N Ray replicas, prefix routing then pow2, and compare")
    parser.add_argument("--chats", type=int, default=8, help="concurrent chats with --url / --ray-replicas")
    args = parser.parse_args()
    if args.url or args.ray_replicas:
        main_http(args)
        return

    engines = {
        name: LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, cache=CacheConfig(enable_prefix_caching=on)))
        for name, on in (("cached", True), ("uncached", False))
    }
    for engine in engines.values():  # warm-up: first calls of each kernel shape are slower
        play(engine, repeat=-1, turns=2, max_tokens=8)
    runs: dict[str, list[list[dict]]] = {name: [] for name in engines}
    for repeat in range(args.repeats):
        for name, engine in engines.items():
            runs[name].append(play(engine, repeat, args.turns, args.max_tokens))

    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT cached':>12} {'TTFT uncached':>14}  (medians of {args.repeats})")
    def median(name: str, turn: int, key: str) -> float:
        return statistics.median(run[turn][key] for run in runs[name])

    for turn in range(args.turns):
        print(f"{turn + 1:>4} {median('cached', turn, 'prompt_tokens'):>7.0f} {median('cached', turn, 'cached_tokens'):>7.0f} "
              f"{median('cached', turn, 'ttft_s') * 1e3:>9.0f} ms {median('uncached', turn, 'ttft_s') * 1e3:>11.0f} ms")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "dtype": args.dtype, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
