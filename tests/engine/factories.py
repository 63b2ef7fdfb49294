"""Small builders of real engine objects for unit tests: requests, sequences, block managers, schedulers."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.request import Request, Sequence
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler

_ids = itertools.count()


def make_request(
    prompt_token_ids: Iterable[int] = (1, 2, 3, 4),
    params: SamplingParams | None = None,
    request_id: str | None = None,
    **param_values,
) -> Request:
    """A request with `params.n` sequences, each seeded as the engine seeds them."""
    params = params if params is not None else SamplingParams(**param_values)
    prompt = list(prompt_token_ids)
    request = Request(request_id or f"req-{next(_ids)}", prompt, params, arrival_time=0.0)
    for index in range(params.n):
        seq = Sequence(next(_ids), request, index, list(prompt))
        if params.seed is not None:
            import torch

            seq.generator = torch.Generator().manual_seed((params.seed + index) & (2**64 - 1))
        request.sequences.append(seq)
    return request


def make_seq(
    prompt_token_ids: Iterable[int] | None = None,
    output_token_ids: Iterable[int] = (),
    *,
    num_prompt_tokens: int = 4,
    **param_values,
) -> Sequence:
    """The single sequence of a new request; `output_token_ids` are already generated."""
    if prompt_token_ids is None:
        prompt_token_ids = range(1, num_prompt_tokens + 1)
    seq = make_request(prompt_token_ids, **param_values).sequences[0]
    seq.token_ids += list(output_token_ids)
    return seq


def make_block_manager(num_blocks: int = 8, block_size: int = 4, prefix_caching: bool = False) -> BlockManager:
    return BlockManager(num_blocks, block_size, prefix_caching)


def make_scheduler(
    num_blocks: int = 8,
    block_size: int = 4,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int = 2048,
    prefix_caching: bool = False,
    max_prefill_attention: int | None = SchedulerConfig.max_prefill_attention,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs or min(64, max_num_batched_tokens),
        max_num_batched_tokens=max_num_batched_tokens,
        max_prefill_attention=max_prefill_attention,
    )
    bm = make_block_manager(num_blocks, block_size, prefix_caching)
    return Scheduler(config, bm, max_model_len=1 << 20)
