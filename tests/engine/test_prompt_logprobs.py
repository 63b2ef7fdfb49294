"""Prompt logprobs (SamplingParams.prompt_logprobs, max_tokens 0) against transformers."""

from __future__ import annotations

import math

import torch

from engine import LLM, SamplingParams
from engine.config import CacheConfig, SchedulerConfig

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "def add(a, b):\n    return a + b\n",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
]


def transformers_prompt_logprobs(model_dir, ids: list[int], dtype=torch.float32) -> torch.Tensor:
    """float32 log-softmax of every prompt position, [len(ids) - 1, vocab]: row j scores token j + 1."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def check(result, ids, expected, num_top: int, tolerance: float) -> None:
    scored = result.prompt_logprobs
    assert scored[0] is None and len(scored) == len(ids)
    for j, lp in enumerate(scored[1:]):
        want = expected[j]
        assert lp.token_id == ids[j + 1]
        assert abs(lp.logprob - want[ids[j + 1]].item()) < tolerance, (j, lp.logprob, want[ids[j + 1]].item())
        assert len(lp.top) == num_top
        best, runner_up = want.topk(2).values.tolist()
        if best - runner_up > 2 * tolerance:  # a clear favourite: the same top token and rank 1
            assert lp.top[0][0] == int(want.argmax())
            assert (lp.rank == 1) == (ids[j + 1] == int(want.argmax()))
        if tolerance < 0.01:  # float32: ranks as transformers counts them
            assert lp.rank == int((want > want[ids[j + 1]]).sum()) + 1


def test_prompt_logprobs_equal_transformers_log_softmax(default_model_dir):
    """Our float32 model within 1e-3 of transformers' float32 log-softmax, ranks included."""
    llm = LLM(str(default_model_dir), dtype="float32")
    prompts = [llm.tokenizer.encode(t) for t in TEXTS]
    results = llm.generate(prompts, SamplingParams(max_tokens=0, prompt_logprobs=3, temperature=0))
    for ids, result in zip(prompts, results, strict=True):
        assert result.completions[0].token_ids == [] and result.completions[0].finish_reason == "length"
        check(result, ids, transformers_prompt_logprobs(default_model_dir, ids), 3, 1e-3)


def test_bf16_prompt_logprobs_stray_no_further_than_transformers_bf16(default_model_dir):
    """The default bf16 model against transformers' float32 log-softmax: its largest error over
    the prompt tokens at most 1.5x that of transformers' own bf16 model (about 0.2 here)."""
    llm = LLM(str(default_model_dir))
    prompts = [llm.tokenizer.encode(t) for t in TEXTS]
    results = llm.generate(prompts, SamplingParams(max_tokens=0, prompt_logprobs=0))
    our_gap = their_gap = 0.0
    for ids, result in zip(prompts, results, strict=True):
        rows = torch.arange(len(ids) - 1)
        exact = transformers_prompt_logprobs(default_model_dir, ids)[rows, ids[1:]]
        theirs = transformers_prompt_logprobs(default_model_dir, ids, torch.bfloat16)[rows, ids[1:]]
        ours = torch.tensor([lp.logprob for lp in result.prompt_logprobs[1:]])
        our_gap = max(our_gap, (ours - exact).abs().max().item())
        their_gap = max(their_gap, (theirs - exact).abs().max().item())
    assert our_gap < 1.5 * their_gap, (our_gap, their_gap)


def test_prompt_logprobs_survive_chunks_preemption_and_the_prefix_cache(default_model_dir):
    """Chunked prefill, a second request with the same prompt (its blocks cached) and generation
    after the prompt: the same scores as a prompt scored alone in one chunk."""
    alone = LLM(str(default_model_dir), dtype="float32")
    ids = alone.tokenizer.encode(TEXTS[0] + " " + TEXTS[2])
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    [want] = alone.generate([ids], params)

    chunked = LLM(
        str(default_model_dir), dtype="float32", cache=CacheConfig(block_size=4),
        scheduler=SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=4),
    )  # fmt: skip
    generating = SamplingParams(max_tokens=5, prompt_logprobs=0, temperature=0, ignore_eos=True)
    results = chunked.generate([ids, ids, ids], [params, generating, params])
    for result in results:
        assert [lp and lp.token_id for lp in result.prompt_logprobs] == [lp and lp.token_id for lp in want.prompt_logprobs]
        assert all(
            math.isclose(a.logprob, b.logprob, abs_tol=1e-4)
            for a, b in zip(result.prompt_logprobs[1:], want.prompt_logprobs[1:], strict=True)
        )
    assert len(results[1].completions[0].token_ids) == 5
