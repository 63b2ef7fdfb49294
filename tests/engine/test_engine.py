"""The engine end to end: greedy parity with transformers under every batching pattern."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine import LLM, CacheConfig, EngineConfig, LLMEngine, SamplingParams
from engine.llm import Completion, GenerationResult, accumulate
from tests.conftest import write_tiny_checkpoint

pytestmark = pytest.mark.slow  # real or tiny model weights, kernel builds or servers

MAX_TOKENS = 24
CHATS = [
    "Hi!",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List the planets of the solar system in order from the sun, with one fact about each.",
    "Explain what a hash table is. " * 3,
    "Translate into French: the cat sleeps on the warm windowsill while the rain falls outside.",
    "Summarise the following text. " + "The quick brown fox jumps over the lazy dog. " * 30,
    "2+2=?",
]


def hf_greedy(model_dir, prompts: list[list[int]], max_new_tokens: int, ignore_eos: bool = False) -> list[list[int]]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if ignore_eos:
        model.generation_config.eos_token_id = None
    outputs = []
    for prompt in prompts:
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
        )
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


def run_staggered(engine: LLMEngine, prompts, params, joins_every: int = 3) -> list[list[int]]:
    """Add one prompt every `joins_every` steps, so requests join a batch already decoding."""
    results = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % joins_every == 0:
            i, prompt = pending.pop(0)
            results[str(i)] = GenerationResult(str(i), prompt, [Completion(0)])
            engine.add_request(str(i), prompt, params)
        for output in engine.step():
            accumulate(results[output.request_id], output)
        step += 1
    return [results[str(i)].completions[0].token_ids for i in range(len(prompts))]


def generate_each(llm: LLM, prompts, params) -> list[list[int]]:
    return [llm.generate([p], params)[0].completions[0].token_ids for p in prompts]


def generate_all(llm: LLM, prompts, params) -> list[list[int]]:
    return [r.completions[0].token_ids for r in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def real_setup(default_model_dir):
    llm = LLM(str(default_model_dir), dtype="float32")
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": c}]) for c in CHATS]
    expected = hf_greedy(default_model_dir, prompts, MAX_TOKENS)
    return llm, prompts, expected


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)


def test_real_model_one_at_a_time(real_setup):
    llm, prompts, expected = real_setup
    assert generate_each(llm, prompts, GREEDY) == expected


def test_real_model_all_at_once(real_setup):
    llm, prompts, expected = real_setup
    assert generate_all(llm, prompts, GREEDY) == expected


def test_real_model_staggered_joins(real_setup):
    llm, prompts, expected = real_setup
    assert run_staggered(llm.engine, prompts, GREEDY) == expected


def test_real_model_chunked_prefill(real_setup, default_model_dir):
    _, prompts, expected = real_setup
    llm = LLM(str(default_model_dir), dtype="float32",
              scheduler=dataclasses.replace(EngineConfig().scheduler, max_num_seqs=8, max_num_batched_tokens=48))
    assert max(len(p) for p in prompts) > 48
    assert generate_all(llm, prompts, GREEDY) == expected


def test_real_model_preemption_under_a_small_pool(real_setup, default_model_dir):
    _, prompts, expected = real_setup
    # Requests that run their full MAX_TOKENS (no early eos), twice over: they outgrow the pool.
    chosen = [i for i, e in enumerate(expected) if len(e) == MAX_TOKENS and len(prompts[i]) < 100] * 2
    llm = _small_pool_llm(default_model_dir, num_tokens=20 * 16)
    assert generate_all(llm, [prompts[i] for i in chosen], GREEDY) == [expected[i] for i in chosen]
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_used_blocks == 0


def _small_pool_llm(model_dir, num_tokens: int, dtype: str = "float32") -> LLM:
    from engine.config import ModelConfig

    bytes_per_token = ModelConfig.from_pretrained(model_dir).kv_bytes_per_token(4 if dtype == "float32" else 2)
    return LLM(str(model_dir), dtype=dtype, cache=CacheConfig(memory_bytes=num_tokens * bytes_per_token))


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_tiny_models_match_transformers_in_every_pattern(tmp_path, model_type):
    path = write_tiny_checkpoint(tmp_path / model_type, model_type, tie_word_embeddings=model_type == "qwen2")
    prompts = [[1] + list(range(5, 5 + n)) for n in (3, 40, 9, 75, 1, 20)]
    expected = hf_greedy(path, prompts, 16, ignore_eos=True)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    llm = LLM(str(path), dtype="float32", max_model_len=256)
    assert generate_each(llm, prompts, params) == expected
    assert generate_all(llm, prompts, params) == expected
    assert run_staggered(llm.engine, prompts, params, joins_every=2) == expected
    small = _small_pool_llm(path, num_tokens=6 * 16)  # the longest request needs all 6 blocks
    assert generate_all(small, prompts, params) == expected
    assert small.engine.scheduler.num_preemptions > 0


def test_seeded_request_is_the_same_alone_and_in_a_batch(real_setup):
    llm, prompts, _ = real_setup
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=MAX_TOKENS)
    alone = llm.generate([prompts[2]], seeded)[0].completions[0].text
    others = [SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=i) for i in range(7)]
    batch = llm.generate([prompts[2]] + prompts[:7], [seeded] + others)
    assert batch[0].completions[0].text == alone
    assert len({r.completions[0].text for r in batch[1:]}) > 1


def test_n_sequences_and_stop_strings(real_setup):
    llm, prompts, expected = real_setup
    result = llm.generate([prompts[1]], SamplingParams(temperature=1.0, n=3, seed=7, max_tokens=16))[0]
    assert [c.index for c in result.completions] == [0, 1, 2]
    assert all(c.token_ids for c in result.completions)
    greedy_text = llm.tokenizer.decode(expected[3])
    stop = greedy_text.split()[3]
    out = llm.generate([prompts[3]], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop=[stop]))[0]
    c = out.completions[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == greedy_text[: greedy_text.index(stop)]


def test_no_block_leaks_after_aborts(real_setup):
    llm, prompts, _ = real_setup
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"a{i}", p, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    engine.step()
    engine.step()
    for i in range(0, len(prompts), 2):
        final = engine.abort_request(f"a{i}")
        assert final.finished and all(o.finish_reason == "abort" for o in final.outputs)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_used_blocks == 0
    assert not engine.scheduler.running and not engine.scheduler.waiting


@pytest.mark.parametrize("prompt_len", [16, 21])  # a whole number of blocks, and a partial last block
def test_greedy_siblings_share_the_prompt_and_match_a_single_sequence(tmp_path, prompt_len):
    path = write_tiny_checkpoint(tmp_path / "m", "llama")
    llm = LLM(str(path), dtype="float32", max_model_len=256)
    prompt = [1] + list(range(7, 6 + prompt_len))
    single = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    engine = llm.engine
    engine.add_request("n3", prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=3))
    result = GenerationResult("n3", prompt, [Completion(i) for i in range(3)])
    # Queued: one request, its three sequences (two of them awaiting the fork) all waiting.
    stats = engine.stats()
    assert (stats.num_requests_waiting, stats.num_seqs_waiting, stats.num_seqs_running) == (1, 3, 0)
    for output in engine.step():
        accumulate(result, output)
    # One prefill for all three; each sibling owns only its copy of a partial last block.
    stats = engine.stats()
    assert (stats.num_requests_running, stats.num_seqs_running, stats.num_seqs_waiting) == (1, 3, 0)
    partial = prompt_len % 16 != 0
    assert engine.block_manager.num_used_blocks == -(-prompt_len // 16) + 2 * partial
    while engine.has_unfinished_requests():
        for output in engine.step():
            accumulate(result, output)
    want = single[0].completions[0].token_ids
    assert [c.token_ids for c in result.completions] == [want] * 3
    assert engine.block_manager.num_used_blocks == 0


def _stream_text(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> tuple[list[str], str | None]:
    engine.add_request("stream", prompt, params)
    deltas, reason = [], None
    while engine.has_unfinished_requests():
        for output in engine.step():
            for delta in output.outputs:
                deltas.append(delta.text)
                reason = delta.finish_reason or reason
    return deltas, reason


@pytest.mark.parametrize("where", ["across tokens", "inside a token", "several stops"])
def test_stop_strings_are_trimmed_and_never_streamed(real_setup, where):
    llm, prompts, expected = real_setup
    text = llm.tokenizer.decode(expected[3])
    pieces = [llm.tokenizer.decode([t]) for t in expected[3]]
    if where == "across tokens":  # the end of one token and the start of the next two
        start = len("".join(pieces[:6])) - 2
        stops = [text[start : start + len(pieces[6]) + len(pieces[7]) + 2]]
    elif where == "inside a token":  # two letters from the middle of one word
        token = next(p for p in pieces[5:] if len(p.strip()) >= 4)
        at = text.index(token, len("".join(pieces[:5]))) + 2
        stops = [text[at : at + 2]]
    else:  # the earliest match wins, whatever the order of the list
        stops = [text[40:46], text[25:30], "never appears in the output"]
    deltas, reason = _stream_text(llm.engine, prompts[3], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop=stops))
    cut = min(text.index(s) for s in stops if s in text)
    # Deltas only ever append, so if they join to the trimmed text no part of a stop was sent.
    assert "".join(deltas) == text[:cut]
    assert reason == "stop"


def test_bf16_greedy_tokens_do_not_depend_on_the_batch(default_model_dir):
    """Every row is computed as if alone (attention row by row, linears whose rows do not mix),
    so the tokens are the same whatever else runs, and whether a prompt's first blocks come
    from the prefix cache (here the chat template's system prompt, after the first request)."""
    llm = LLM(str(default_model_dir))  # bfloat16, the default
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": c}]) for c in CHATS]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    alone = generate_each(llm, prompts, params)
    assert llm.engine.scheduler.num_prefix_hit_tokens > 0
    assert generate_all(llm, prompts, params) == alone
    assert run_staggered(llm.engine, prompts, params) == alone
    uncached = LLM(str(default_model_dir), cache=CacheConfig(enable_prefix_caching=False))
    assert generate_all(uncached, prompts, params) == alone
    assert uncached.engine.scheduler.num_prefix_hit_tokens == 0


def test_a_later_chat_turn_reuses_the_earlier_turns_from_the_prefix_cache(real_setup):
    llm, _, _ = real_setup
    chat = [{"role": "user", "content": CHATS[4]}]
    first = llm.chat([chat], GREEDY)[0]
    chat += [{"role": "assistant", "content": first.completions[0].text}, {"role": "user", "content": "Shorter, please."}]
    prompt = llm.tokenizer.encode_chat(chat)
    assert prompt[: len(first.prompt_token_ids)] == first.prompt_token_ids
    llm.engine.add_request("turn-2", prompt, GREEDY)
    outputs = []
    while llm.engine.has_unfinished_requests():
        outputs += llm.engine.step()
    # The first turn's prompt, all of its whole blocks, came from the cache.
    assert outputs[-1].num_cached_tokens >= len(first.prompt_token_ids) // 16 * 16
    tokens = [t for o in outputs for t in o.outputs[0].token_ids]
    assert tokens == hf_greedy(llm.engine.model_path, [prompt], MAX_TOKENS)[0]
