"""Parity with transformers: the same weights, the same logits and greedy tokens."""

from __future__ import annotations

import torch

from engine.loader import load_model
from tests.engine.model_driver import greedy_generate, prefill_logits

PROMPTS = [[1, 5, 9, 200, 17], [1] + list(range(30, 70)), [1, 99], list(range(3, 40, 2))]


def hf_model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Exactly max_new_tokens greedy tokens: like the bare driver, transformers does not stop at eos."""
    model.generation_config.eos_token_id = None
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def check_parity(path, ours=None) -> None:
    """Prefill logits and 32 greedy tokens of `ours` (by default our float32 load of `path`)
    against transformers' float32 model of `path`."""
    ours = ours if ours is not None else load_model(path, dtype=torch.float32)
    ref = hf_model(path)
    with torch.inference_mode():
        expected = [ref(torch.tensor([p])).logits[0] for p in PROMPTS]
    for got, want in zip(prefill_logits(ours, PROMPTS), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    got_tokens = greedy_generate(ours, PROMPTS, 32)
    assert got_tokens == [hf_greedy(ref, p, 32) for p in PROMPTS]
