"""Scoring prompts through the API: completions echo + logprobs (max_tokens 0, as
lm-evaluation-harness sends it) and vLLM's prompt_logprobs, streamed and not."""

from __future__ import annotations

import math

from openai import OpenAI

PROMPT = "The capital of France is Paris. The capital of Germany is"


def test_echo_with_logprobs_and_no_new_tokens_scores_the_prompt(client: OpenAI) -> None:
    scored = client.completions.create(model="smol", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = scored.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert scored.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == scored.usage.prompt_tokens
    assert "".join(lp.tokens) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v < 0 for v in lp.token_logprobs[1:])
    assert all(len(top) == 1 and max(top.values()) >= v - 1e-6 for top, v in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # " Paris" after "The capital of France is" is the model's clear choice.
    paris = lp.tokens.index(" Paris")
    assert lp.token_logprobs[paris] > math.log(0.5) and lp.top_logprobs[paris] == {" Paris": lp.token_logprobs[paris]}

    stream = client.completions.create(model="smol", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0, stream=True)
    chunks = [c.choices[0] for c in stream if c.choices]
    assert "".join(c.text for c in chunks) == PROMPT
    streamed = [t for c in chunks if c.logprobs for t in c.logprobs.token_logprobs]
    assert streamed == lp.token_logprobs


def test_a_generated_token_scores_the_same_as_part_of_a_prompt(client: OpenAI) -> None:
    """The logprob of the token greedy decoding picks equals its logprob once it is part of the
    prompt: a decode row and a prompt row are computed alike."""
    generated = client.completions.create(model="smol", prompt=PROMPT, max_tokens=3, logprobs=0, temperature=0)
    text, lp = generated.choices[0].text, generated.choices[0].logprobs
    echoed = client.completions.create(model="smol", prompt=PROMPT + text, max_tokens=0, echo=True, logprobs=0, temperature=0)
    tail = echoed.choices[0].logprobs
    assert tail.tokens[-3:] == lp.tokens
    assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(tail.token_logprobs[-3:], lp.token_logprobs))


def test_vllm_prompt_logprobs_on_chat_and_completions(client: OpenAI) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model="smol", messages=messages, max_tokens=2, temperature=0,
                                          extra_body={"prompt_logprobs": 2})  # fmt: skip
    scores = chat.model_extra["prompt_logprobs"]
    assert len(scores) == chat.usage.prompt_tokens and scores[0] is None
    for entry in scores[1:]:
        assert 1 <= len(entry) <= 3  # the prompt token, plus the top 2 where it is not among them
        ranks = sorted(v["rank"] for v in entry.values())
        assert ranks[:2] == [1, 2] or ranks[0] >= 1
        assert all(v["logprob"] <= 0 and isinstance(v["decoded_token"], str) for v in entry.values())

    plain = client.completions.create(model="smol", prompt=PROMPT, max_tokens=1, temperature=0,
                                      extra_body={"prompt_logprobs": 0})  # fmt: skip
    entries = plain.choices[0].model_extra["prompt_logprobs"]
    assert len(entries) == plain.usage.prompt_tokens and entries[0] is None
    assert all(len(entry) == 1 for entry in entries[1:])  # the prompt token alone
    echoed = client.completions.create(model="smol", prompt=PROMPT, max_tokens=0, echo=True, logprobs=0, temperature=0)
    assert [next(iter(e.values()))["logprob"] for e in entries[1:]] == echoed.choices[0].logprobs.token_logprobs[1:]
