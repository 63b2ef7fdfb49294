"""AsyncEngine on its own thread: streamed deltas, early exit aborts, admission errors."""

from __future__ import annotations

import asyncio

import pytest

from engine import AsyncEngine, ContextLengthExceeded, EngineConfig, SamplingParams
from tests.conftest import write_tiny_checkpoint

pytestmark = pytest.mark.slow  # real or tiny model weights, kernel builds or servers

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture
def engine_config(tmp_path) -> EngineConfig:
    path = write_tiny_checkpoint(tmp_path / "m", "llama")
    return EngineConfig(model=str(path), dtype="float32", max_model_len=128)


async def _collect(engine: AsyncEngine, prompt: list[int], request_id: str) -> list[int]:
    tokens = []
    async for output in engine.generate(prompt, GREEDY, request_id):
        tokens += output.outputs[0].token_ids if output.outputs else []
        last = output
    assert last.finished and last.outputs[0].finish_reason == "length"
    return tokens


def test_concurrent_streams_match_solo_runs_and_early_exit_frees_blocks(engine_config):
    async def main():
        engine = AsyncEngine(engine_config)
        engine.start()
        try:
            prompts = [[1, 5, 9], [1] + list(range(20, 60)), [1, 7]]
            solo = [await _collect(engine, p, f"solo{i}") for i, p in enumerate(prompts)]
            together = await asyncio.gather(*(_collect(engine, p, f"b{i}") for i, p in enumerate(prompts)))
            assert together == solo and all(len(t) == 12 for t in solo)

            stream = engine.generate(prompts[1], SamplingParams(max_tokens=80, ignore_eos=True), "left")
            await anext(stream)
            await stream.aclose()  # the client went away
            for _ in range(100):
                if engine.stats().num_kv_blocks_used == 0 and engine.stats().num_seqs_running == 0:
                    break
                await asyncio.sleep(0.01)
            assert engine.stats().num_kv_blocks_used == 0

            with pytest.raises(ContextLengthExceeded):
                await anext(engine.generate([1] * 120, SamplingParams(max_tokens=20), "too-long"))
            assert engine.is_alive
        finally:
            await engine.shutdown()
        assert not engine.is_alive

    asyncio.run(main())
