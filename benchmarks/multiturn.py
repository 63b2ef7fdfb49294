"""Multi-turn chat: time to first token of each turn, with and without prefix caching.

    python benchmarks/multiturn.py --model smollm2-135m-instruct --turns 6 --repeats 3

A conversation (one of the prompt set's long documents to summarise, then follow-up requests)
is played turn by turn through the engine. Each turn's prompt holds the whole history, as a
chat client sends it, so without a prefix cache every turn recomputes all earlier ones. Two
engines in one process, one with prefix caching and one without, take turns (the host's speed
drifts); each repeat opens with a different first line, so nothing carries over from the last
repeat but the chat template's system prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64, help="answer length cap per turn")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

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
