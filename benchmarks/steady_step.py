"""The engine's steady decode step: time per step with B sequences decoding, prefill excluded.

    python benchmarks/steady_step.py --model smollm2-135m-instruct --sequences 1,16 --profile

B random prompts of about --context tokens are prefilled first; then every step decodes one token
of each (greedy, eos ignored, speculation off unless --speculative-tokens). Reports the minimum
and median step time and the tokens/s the median gives; --profile adds the torch profiler's
table of the kernels that took the time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import LLMEngine, SamplingParams  # noqa: E402
from engine.config import EngineConfig, SchedulerConfig  # noqa: E402


def step_times(engine: LLMEngine, num_seqs: int, context: int, steps: int) -> list[float]:
    params = SamplingParams(temperature=0.0, max_tokens=steps + 20, ignore_eos=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(num_seqs):
        prompt = torch.randint(100, 40000, (context + 7 * i,), generator=generator).tolist()
        engine.add_request(f"seq-{num_seqs}-{i}", prompt, params)
    while engine.scheduler.waiting or any(s.num_uncomputed_tokens > 1 for s in engine.scheduler.running):
        engine.step()
    for _ in range(3):  # warm-up
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--sequences", default="1,16", help="batch sizes, comma-separated")
    parser.add_argument("--context", type=int, default=150, help="prompt tokens of the first sequence")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--speculative-tokens", type=int, default=0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-fused-stack", action="store_true", help="run the decoder layers module by module")
    args = parser.parse_args()

    scheduler = SchedulerConfig(speculative_tokens=args.speculative_tokens)
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, scheduler=scheduler))
    decoder = engine.model.model
    print(f"fused decoder stack: {'off' if args.no_fused_stack else 'on' if decoder.fused_stack else 'unavailable'}")
    if args.no_fused_stack:
        decoder.fused_stack = None
    for num_seqs in [int(n) for n in args.sequences.split(",")]:
        times = step_times(engine, num_seqs, args.context, args.steps)
        median = statistics.median(times)
        print(f"{num_seqs:>3} sequences: step min {min(times) * 1e3:.2f} ms, median {median * 1e3:.2f} ms "
              f"-> {num_seqs / median:.0f} tok/s", flush=True)  # fmt: skip
        if args.profile:
            from torch.profiler import profile

            with profile() as prof:
                for _ in range(10):
                    engine.step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        for request_id in list(engine.requests):
            engine.abort_request(request_id)


if __name__ == "__main__":
    main()
