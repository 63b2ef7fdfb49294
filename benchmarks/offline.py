"""Offline throughput: Kestrel's LLM engine vs transformers' static-batch generate, same process.

    python benchmarks/offline.py --model smollm2-135m-instruct --batch-sizes 1,16,64

Every prompt generates exactly --max-tokens tokens (eos ignored on both sides) so both
systems do the same work. Prefix caching is off: each batch size reuses the prompts of the one
before, which would otherwise come from the cache (benchmarks/multiturn.py measures it). Besides tokens/s it reports two measures of waste in Kestrel:
the share of allocated KV slots holding no token, and the share of padding in the
rectangular batches attention reads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import LLMEngine, SamplingParams  # noqa: E402
from engine.config import CacheConfig, EngineConfig  # noqa: E402

PROMPTS = Path(__file__).with_name("prompts_v1.json")


def load_conversations(n: int) -> list[list[dict]]:
    conversations = json.loads(PROMPTS.read_text())["conversations"]
    return [conversations[i % len(conversations)] for i in range(n)]


def run_kestrel(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    runner, bm = engine.runner, engine.block_manager
    runner.num_kv_slots_read = runner.num_kv_slots_used = 0
    allocated = used = 0
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{i}", prompt, params)
    num_tokens = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            num_tokens += sum(len(o.token_ids) for o in output.outputs)
        allocated += bm.num_used_blocks * bm.block_size
        used += sum(seq.num_computed_tokens for seq in engine.scheduler.running)
    elapsed = time.perf_counter() - start
    return {
        "output_tokens": num_tokens,
        "seconds": elapsed,
        "tokens_per_s": num_tokens / elapsed,
        "kv_wasted_share": 1 - used / allocated if allocated else 0.0,
        "padded_share": 1 - runner.num_kv_slots_used / max(runner.num_kv_slots_read, 1),
    }


def run_transformers(model, prompts: list[list[int]], max_tokens: int, pad_id: int) -> dict:
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
            do_sample=False, pad_token_id=pad_id,
        )
    elapsed = time.perf_counter() - start
    num_tokens = (out.shape[1] - width) * len(prompts)
    return {"output_tokens": num_tokens, "seconds": elapsed, "tokens_per_s": num_tokens / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    engine = LLMEngine(
        EngineConfig(model=args.model, dtype=args.dtype, cache=CacheConfig(enable_prefix_caching=False))
    )
    reference = None
    if not args.skip_transformers:
        import transformers

        reference = transformers.AutoModelForCausalLM.from_pretrained(
            engine.model_path, dtype=getattr(torch, args.dtype)
        ).eval()
    pad_id = engine.tokenizer.pad_token_id or 0

    # Warm-up: first calls of each kernel shape are slower.
    warm = [engine.tokenizer.encode_chat(c) for c in load_conversations(2)]
    run_kestrel(engine, warm, 8)

    rows = []
    for n in [int(x) for x in args.batch_sizes.split(",")]:
        prompts = [engine.tokenizer.encode_chat(c) for c in load_conversations(n)]
        row = {"batch": n, "mean_prompt_tokens": sum(map(len, prompts)) / n}
        row["kestrel"] = run_kestrel(engine, prompts, args.max_tokens)
        if reference is not None:
            row["transformers"] = run_transformers(reference, prompts, args.max_tokens, pad_id)
        rows.append(row)
        print_row(row)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "dtype": args.dtype, "rows": rows}, indent=2))


def print_row(row: dict) -> None:
    k = row["kestrel"]
    line = (
        f"batch {row['batch']:>3} (prompt ~{row['mean_prompt_tokens']:.0f} tok): "
        f"kestrel {k['tokens_per_s']:8.1f} tok/s  kv waste {k['kv_wasted_share']:.1%}  "
        f"padding {k['padded_share']:.1%}"
    )
    if "transformers" in row:
        t = row["transformers"]
        line += f" | transformers {t['tokens_per_s']:8.1f} tok/s  ratio {k['tokens_per_s'] / t['tokens_per_s']:.1f}x"
    print(line, flush=True)


if __name__ == "__main__":
    main()
