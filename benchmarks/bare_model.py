"""The bare model, no engine: load time, resident memory, single-sequence greedy tokens/s.

    python benchmarks/bare_model.py --model smollm2-135m-instruct --dtype bfloat16
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.assets import resolve_model  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402
from tests.engine.model_driver import greedy_generate  # noqa: E402  (the same loop the parity tests use)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()

    model_dir = resolve_model(args.model)
    before = rss_mib()
    start = time.perf_counter()
    model = load_model(model_dir, dtype=getattr(torch, args.dtype))
    load_s = time.perf_counter() - start
    after = rss_mib()
    prompt = Tokenizer.from_pretrained(model_dir).encode_chat(
        [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    )
    greedy_generate(model, [prompt], 8)  # warm-up
    start = time.perf_counter()
    greedy_generate(model, [prompt], args.new_tokens)
    tok_s = args.new_tokens / (time.perf_counter() - start)
    print(
        f"{args.model} {args.dtype}: load {load_s:.2f} s, RSS {after:.0f} MiB "
        f"(+{after - before:.0f} MiB for the model), greedy {tok_s:.1f} tok/s "
        f"({args.new_tokens} tokens after a {len(prompt)}-token prompt)"
    )


if __name__ == "__main__":
    main()
