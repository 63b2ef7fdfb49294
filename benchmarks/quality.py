"""What quantization costs in quality: perplexity on a fixed text and greedy agreement with bf16.

    python benchmarks/quality.py --model smollm2-135m-instruct
    python benchmarks/quality.py --model qwen2.5-coder-0.5b-instruct --prompts 32

For each variant of the model (bf16 as converted; --quantization int8 and q4 of it; the
catalogue's GGUF file as it is) in one process, one after the other:
- perplexity of benchmarks/texts/declaration_of_independence.txt (public domain), scored in
  windows of --window tokens with prompt_logprobs, as lm-evaluation-harness scores a text;
- greedy agreement with bf16 over the first --prompts chat prompts of prompts_v1.json,
  --max-tokens each: the share of positions where the variant's token equals bf16's (counted up
  to the first difference, after which the two texts diverge), and how many answers are equal.

--llama-cpp adds llama.cpp's llama-server on the same GGUF file (built by
benchmarks/build_llama_server.sh): the same prompt token ids sent to its /completion endpoint,
greedy, eos ignored, its answers' token ids compared the same way (no perplexity for it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import LLM, SamplingParams  # noqa: E402
from engine.assets import get_entry  # noqa: E402
from engine.config import CacheConfig  # noqa: E402

from peer import PeerSetup, free_port, launched, setup_llama_cpp  # noqa: E402

HERE = Path(__file__).resolve().parent
TEXT = HERE / "texts" / "declaration_of_independence.txt"
PROMPTS = HERE / "prompts_v1.json"


@dataclass
class Variant:
    label: str
    model: str
    quantization: str = "none"


@dataclass
class Quality:
    label: str
    weight_mib: float
    perplexity: float | None
    agreement: float  # matching positions up to the first difference / all positions
    identical: int  # answers equal to bf16's
    seconds: float


def perplexity(llm: LLM, window: int) -> float:
    ids = llm.tokenizer.encode(TEXT.read_text(), add_special_tokens=False)
    windows = [ids[i : i + window] for i in range(0, len(ids) - 1, window)]
    windows = [w for w in windows if len(w) > 1]
    results = llm.generate(windows, SamplingParams(max_tokens=0, prompt_logprobs=0))
    logprobs = [lp.logprob for r in results for lp in r.prompt_logprobs[1:]]
    return math.exp(-sum(logprobs) / len(logprobs))


def greedy_answers(llm: LLM, conversations: list[list[dict]], max_tokens: int) -> list[list[int]]:
    prompts = [llm.tokenizer.encode_chat(c) for c in conversations]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [r.completions[0].token_ids for r in llm.generate(prompts, params)]


def llama_cpp_answers(gguf_name: str, prompts: list[list[int]], conversations: list[list[dict]],
                      max_tokens: int) -> list[list[int]]:  # fmt: skip
    """llama-server's greedy answers to the prompts (token ids in, token ids out), one at a time."""
    setup = PeerSetup(model=gguf_name, dtype="bfloat16", device="cpu", max_concurrency=1, max_tokens=max_tokens,
                      conversations=conversations)  # fmt: skip
    launch, port = setup_llama_cpp(setup), free_port()
    answers = []
    with (
        tempfile.TemporaryDirectory() as logs,
        launched("llama.cpp", launch.command(port), port, Path(logs), 300) as server,
        httpx.Client(trust_env=False, timeout=600) as client,
    ):
        for prompt in prompts:
            body = {"prompt": prompt, "n_predict": max_tokens, "temperature": 0.0, "ignore_eos": True,
                    "return_tokens": True, "cache_prompt": False}  # fmt: skip
            response = client.post(f"{server.base_url}/completion", json=body)
            response.raise_for_status()
            answers.append(response.json()["tokens"])
    return answers


def agreement(answers: list[list[int]], reference: list[list[int]]) -> tuple[float, int]:
    matched = total = identical = 0
    for ours, theirs in zip(answers, reference, strict=True):
        prefix = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        matched += prefix
        total += len(theirs)
        identical += ours == theirs
    return matched / total, identical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a catalogue name")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--llama-cpp", action="store_true", help="add llama-server on the GGUF file")
    args = parser.parse_args()

    entry = get_entry(args.model)
    variants = [
        Variant("bf16", entry.name),
        Variant("int8 (Q8_0 at load)", entry.name, "int8"),
        Variant("q4 (Q4_1 at load)", entry.name, "q4"),
        Variant(f"GGUF as is ({entry.quantization})", entry.gguf_name),
    ]
    conversations = json.loads(PROMPTS.read_text())["conversations"][: args.prompts]
    reference: list[list[int]] | None = None
    rows = []
    for variant in variants:
        start = time.perf_counter()
        llm = LLM(variant.model, quantization=variant.quantization, cache=CacheConfig(enable_prefix_caching=False))
        ppl = perplexity(llm, args.window)
        answers = greedy_answers(llm, conversations, args.max_tokens)
        reference = reference or answers
        share, identical = agreement(answers, reference)
        rows.append(Quality(variant.label, llm.engine.num_weight_bytes / 2**20, ppl, share, identical,
                            time.perf_counter() - start))  # fmt: skip
        print(f"{variant.label}: done in {rows[-1].seconds:.0f} s", file=sys.stderr, flush=True)
        if variant.model == entry.gguf_name and args.llama_cpp:
            start = time.perf_counter()
            prompts = [llm.tokenizer.encode_chat(c) for c in conversations]
            share, identical = agreement(llama_cpp_answers(entry.gguf_name, prompts, conversations, args.max_tokens),
                                         reference)  # fmt: skip
            rows.append(Quality(f"llama.cpp on the same GGUF ({entry.quantization})", llm.engine.num_weight_bytes / 2**20,
                                None, share, identical, time.perf_counter() - start))  # fmt: skip
        del llm

    print(f"\n{args.model}: perplexity on {TEXT.name} ({args.window}-token windows); greedy agreement "
          f"with bf16 over {len(conversations)} prompts x {args.max_tokens} tokens\n")  # fmt: skip
    print("| variant | weights MiB | perplexity | agreement | identical answers |")
    print("|---|---|---|---|---|")
    for q in rows:
        ppl = "-" if q.perplexity is None else f"{q.perplexity:.3f}"
        print(f"| {q.label} | {q.weight_mib:.0f} | {ppl} | {q.agreement:.1%} | "
              f"{q.identical}/{len(conversations)} |")  # fmt: skip


if __name__ == "__main__":
    main()
