"""The synchronous engine: requests in, one batched model step at a time, output deltas out."""

from __future__ import annotations

import bisect
import itertools
import logging
import time

import torch

from engine import kernels
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.errors import ContextLengthExceeded, RequestError
from engine.grammar import GrammarCompiler, GrammarError, GrammarSpec
from engine.kv_cache import allocate_kv_cache, num_kv_blocks
from engine.loader import available_memory_bytes, weight_bytes
from engine.model_runner import ModelRunner, ModelRunnerOutput, PromptLogits
from engine.model_source import open_model
from engine.outputs import CompletionOutput, EngineStats, RequestOutput, TokenLogprob
from engine.request import FinishReason, Request, Sequence
from engine.sampler import Sampler, score_tokens
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSequence, Scheduler
from engine.stopping import check_token_stop, find_stop_string, num_held_back_chars
from engine.tokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class LLMEngine:
    """Owns the model, the KV pool, the scheduler and every live request.

    Not thread-safe: one thread calls add_request / abort_request / step.
    """

    def __init__(self, config: EngineConfig) -> None:
        if config.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {config.dtype!r} (choose from {', '.join(DTYPES)})")
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        source = open_model(config.model, chat_template=config.chat_template)
        self.model_path = source.path  # a Hugging Face directory or a GGUF file
        self.model_name = source.name
        self.model_config = source.config
        self.tokenizer = source.tokenizer
        self.generation_defaults = source.generation_defaults
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
        )
        self.device = torch.device(config.device)
        dtype = DTYPES[config.dtype]
        kernels.available_on(self.device)  # builds them now rather than on the first request
        self.model = source.load(dtype, self.device, config.quantization)

        block_size = config.cache.block_size
        memory = config.cache.memory_bytes or int(available_memory_bytes() * config.cache.memory_fraction)
        # No point in a pool larger than max_num_seqs full-length sequences.
        max_blocks = config.scheduler.max_num_seqs * -(-self.max_model_len // block_size)
        num_blocks = min(num_kv_blocks(self.model_config, memory, block_size, dtype), max_blocks)
        if num_blocks < 1:
            raise ValueError(f"KV cache memory {memory} bytes holds no block of {block_size} tokens")
        self.kv_caches = allocate_kv_cache(self.model_config, num_blocks, block_size, dtype, self.device)
        self.block_manager = BlockManager(num_blocks, block_size, config.cache.enable_prefix_caching)
        self.runner = ModelRunner(self.model, self.kv_caches, self.block_manager, self.device)
        # Only the fused attention kernel reads a draft's rows after a decode.
        speculative_tokens = config.scheduler.speculative_tokens if self.runner.fused_attention else 0
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.max_model_len, speculative_tokens)
        self.speculator = self.scheduler.speculator
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids)
        self.sampler = Sampler(self.tokenizer.eos_token_ids)
        self.grammar_compiler = GrammarCompiler(
            self.tokenizer, self.model_config.vocab_size, self.tokenizer.eos_token_ids
        )

        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self.num_weight_bytes = weight_bytes(self.model)
        logger.info(
            "engine ready: %s (%s, %s), weights %.1f MiB, max_model_len %d, %d KV blocks of %d "
            "tokens, %s kernels",
            self.model_name, self.model_config.model_type, config.dtype, self.num_weight_bytes / 2**20,
            self.max_model_len, num_blocks, block_size,
            "fused CPU" if self.runner.fused_attention else "eager torch",
        )  # fmt: skip

    # -- requests -------------------------------------------------------------------------

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError if the request can never be served (no engine state is touched)."""
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise RequestError("the prompt must contain at least one token", param="prompt")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_token_ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        if num_prompt + 1 > self.max_model_len:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt "
                f"has {num_prompt} tokens, leaving no room for a completion"
            )
        if params.max_tokens is not None and num_prompt + params.max_tokens > self.max_model_len:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt "
                f"has {num_prompt} tokens and max_tokens is {params.max_tokens} "
                f"({num_prompt + params.max_tokens} in total)"
            )
        bm = self.block_manager
        if bm.blocks_for(num_prompt + (params.max_tokens or 1)) > bm.num_blocks:
            raise ContextLengthExceeded(
                f"the KV cache holds at most {bm.num_blocks * bm.block_size} tokens per sequence; "
                f"this request needs {num_prompt + (params.max_tokens or 1)}"
            )
        for param, token_ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias)):
            if any(t >= vocab for t in token_ids):
                raise RequestError(f"{param}: token ids must be in [0, {vocab})", param=param)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self.requests:
            raise RequestError(f"duplicate request id {request_id!r}", param="request_id")
        self.check_request(prompt_token_ids, params)
        grammar = params.grammar
        if isinstance(grammar, GrammarSpec):  # compiled here only by synchronous callers
            try:
                grammar = self.grammar_compiler.compile(grammar)
            except GrammarError as exc:
                raise RequestError(f"invalid grammar: {exc}", param="grammar") from None
        request = Request(request_id, list(prompt_token_ids), params, arrival_time or time.monotonic())
        for index in range(params.n):
            seq = Sequence(next(self._seq_ids), request, index, list(prompt_token_ids))
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
            if params.seed is not None:
                seq.generator = torch.Generator().manual_seed((params.seed + index) & (2**64 - 1))
            if grammar is not None:
                seq.grammar = grammar.matcher()
            request.sequences.append(seq)
            if index == 0:
                self.scheduler.add(seq)
            else:
                seq.is_awaiting_fork = True
        self.requests[request_id] = request
        self.num_prompt_tokens += len(prompt_token_ids)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; returns its final output, or None if unknown."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        outputs = []
        for seq in request.sequences:
            if not seq.is_finished:
                seq.finish(FinishReason.ABORT)
                outputs.append(self._delta(seq))
            self.scheduler.remove(seq)
        return RequestOutput(
            request_id, request.prompt_token_ids, outputs, finished=True,
            num_cached_tokens=request.num_cached_tokens or 0,
        )

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and return what changed."""
        plan = self.scheduler.schedule()
        changed: list[Sequence] = list(plan.finished)
        if plan.scheduled:
            try:
                changed += self._run(plan.scheduled)
            except Exception as exc:  # a failed step fails its requests, not the engine
                logger.exception("engine step failed")
                return self._fail({e.seq.request.request_id for e in plan.scheduled}, exc)
        return self._collect(changed)

    @torch.inference_mode()
    def _run(self, scheduled: list[ScheduledSequence]) -> list[Sequence]:
        output = self.runner.execute(scheduled)
        for part in output.prompt_logits:
            self._score_prompt(scheduled[part.entry].seq.request, part)
        for entry in scheduled:
            entry.seq.num_computed_tokens += entry.num_new_tokens
        changed = self._sample(output, scheduled) if output.sampled else []
        for entry in scheduled:  # blocks filled in this step join the prefix cache
            seq = entry.seq
            self.block_manager.cache_blocks(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
        return changed

    @staticmethod
    def _score_prompt(request: Request, part: PromptLogits) -> None:
        """Add the prompt tokens `part` scores; a recomputation (after preemption) adds none twice."""
        scored = request.prompt_logprobs
        tokens = request.prompt_token_ids[part.first_token : part.first_token + len(part.logits)]
        skip = len(scored) - part.first_token  # already scored by an earlier computation
        if skip < len(tokens):
            num_top = request.params.prompt_logprobs
            scored += score_tokens(part.logits[max(skip, 0) :], tokens[max(skip, 0) :], num_top)

    def _sample(self, output: ModelRunnerOutput, scheduled: list[ScheduledSequence]) -> list[Sequence]:
        logits, sampled, verified = output.logits, output.sampled, []
        prompt_only = [i for i in sampled if scheduled[i].seq.request.params.max_tokens == 0]
        if prompt_only:  # max_tokens 0: the prompt is computed (and scored), nothing is sampled
            keep = [row for row, i in enumerate(sampled) if i not in prompt_only]
            logits, sampled = logits[keep], [sampled[row] for row in keep]
        if any(scheduled[i].draft for i in sampled):
            split = self.speculator.split_rows(logits, sampled, scheduled)
            logits, sampled, verified = split.logits, split.sampled, split.verified
        seqs = [scheduled[i].seq for i in sampled]
        rows = list(range(len(seqs)))
        for row, seq in enumerate(list(seqs)):
            for child in self._fork_siblings(seq):
                seqs.append(child)
                rows.append(row)  # the siblings' first tokens come from the same logits
        if len(rows) > len(sampled):
            logits = logits[rows]
        if seqs:
            token_ids, logprobs = self.sampler(logits, seqs)
            for seq, token_id, logprob in zip(seqs, token_ids, logprobs):
                self._append_token(seq, token_id, logprob)
            self.num_generated_tokens += len(seqs)
        for draft in verified:
            self.num_generated_tokens += self.speculator.accept(draft, self._append_token)
        finished = []
        for i in prompt_only:
            for seq in scheduled[i].seq.request.sequences:  # siblings awaiting a fork too
                seq.finish(FinishReason.LENGTH)
                finished.append(seq)
        return seqs + [draft.entry.seq for draft in verified] + finished

    def _fork_siblings(self, seq: Sequence) -> list[Sequence]:
        """After sequence 0 of an n > 1 request has prefilled, start its siblings on shared blocks.

        A sibling that finds no free block for its copy of a partial block is queued to
        prefill on its own instead.
        """
        if seq.num_generated_tokens or seq.request.params.n == 1:
            return []
        siblings = [s for s in seq.request.sequences if s.is_awaiting_fork]
        forked, copies = [], []
        for sibling in siblings:  # empty once forked: later calls do nothing
            sibling.is_awaiting_fork = False
            try:
                copy = self.block_manager.fork(seq.seq_id, sibling.seq_id, seq.num_computed_tokens)
            except MemoryError:
                self.scheduler.add(sibling)
                continue
            if copy is not None:
                copies.append(copy)
            sibling.num_computed_tokens = seq.num_computed_tokens
            self.scheduler.add_running(sibling)
            forked.append(sibling)
        if copies:
            self.runner.copy_blocks(copies)
        return forked

    def _append_token(self, seq: Sequence, token_id: int, logprob: TokenLogprob | None = None) -> None:
        seq.token_ids.append(token_id)
        check_token_stop(seq, self.eos_token_ids, self.max_model_len)
        stops = seq.request.params.stop
        ended_by_token = seq.finish_reason == FinishReason.STOP
        if seq.grammar is not None and not ended_by_token:
            self._advance_grammar(seq, token_id)
        elif seq.grammar is not None and seq.grammar.error:
            # The failed matcher allowed only end-of-sequence: the output is not what the grammar
            # asked for, so the sequence fails rather than stopping.
            self._fail_grammar(seq)
        previous_len = len(seq.output_text)
        if not ended_by_token:  # the eos / stop token itself is not part of the text
            seq.output_text += seq.detokenizer.step([token_id])
        # Logprobs list only tokens of the returned text (as OpenAI does): not the eos / stop
        # token that ended the sequence, nor a special token the detokenizer skips.
        if logprob is not None and not ended_by_token and not seq.detokenizer.is_skipped(token_id):
            seq.logprobs.append(logprob)
        if seq.is_finished:
            seq.output_text += seq.detokenizer.flush()
        if len(seq.output_text) > previous_len or seq.is_finished:
            num_pending = len(seq.logprobs) - len(seq.logprob_text_ends)
            seq.logprob_text_ends += [len(seq.output_text)] * num_pending
        if stops:
            match = find_stop_string(seq.output_text, previous_len, stops)
            if match is not None:
                seq.output_text = seq.output_text[: match[0]]
                seq.finish(FinishReason.STOP, match[1])

    @staticmethod
    def _advance_grammar(seq: Sequence, token_id: int) -> None:
        """Feed the grammar the token; the sequence ends (stop) where nothing but end-of-sequence
        could follow, which saves sampling it."""
        matcher = seq.grammar
        if not matcher.accept(token_id) or matcher.error:
            LLMEngine._fail_grammar(seq)
        elif matcher.is_terminated:
            seq.finish(FinishReason.STOP)

    @staticmethod
    def _fail_grammar(seq: Sequence) -> None:
        """The grammar cannot go on: a resource limit, or no token of the vocabulary spells what
        it demands next (e.g. a byte no token has; llguidance may then allow a token it rejects)."""
        error = (seq.grammar.error or "token rejected").split("\n", 1)[0]
        seq.finish(FinishReason.ABORT)
        seq.request.error = f"structured output failed: {error}"
        seq.request.grammar_failed = True
        logger.warning("request %s: %s", seq.request.request_id, seq.request.error)

    def _collect(self, changed: list[Sequence]) -> list[RequestOutput]:
        by_request: dict[str, list[CompletionOutput]] = {}
        for seq in changed:
            by_request.setdefault(seq.request.request_id, []).append(self._delta(seq))
            if seq.is_finished:
                self.scheduler.remove(seq)
        outputs = []
        for request_id, deltas in by_request.items():
            request = self.requests[request_id]
            finished = request.is_finished
            if finished:
                del self.requests[request_id]
            out = RequestOutput(request_id, request.prompt_token_ids, deltas, finished,
                                error=request.error, grammar_failed=request.grammar_failed,
                                num_cached_tokens=request.num_cached_tokens or 0)  # fmt: skip
            if request.params.prompt_logprobs is not None and not request.has_reported_prompt_logprobs:
                out.prompt_logprobs = request.prompt_logprobs
                request.has_reported_prompt_logprobs = True
            outputs.append(out)
        return outputs

    def _delta(self, seq: Sequence) -> CompletionOutput:
        """What `seq` has not yet reported, holding back text a stop string could still claim."""
        params = seq.request.params
        end = len(seq.output_text)
        if not seq.is_finished and params.stop:
            end -= num_held_back_chars(params.stop)
        text = ""
        if end > seq.num_emitted_chars:
            text = seq.output_text[seq.num_emitted_chars : end]
            seq.num_emitted_chars = end
        new_tokens = seq.token_ids[seq.num_prompt_tokens + seq.num_emitted_tokens :]
        seq.num_emitted_tokens += len(new_tokens)
        logprobs = None
        if params.logprobs is not None:
            # The tokens whose text is wholly emitted. NOTE: a token that a stop string cuts in
            # two is not listed (nor are those inside the stop string), so the listed tokens
            # never run past the content: joined, they equal it, or they fall short of it by
            # the cut token's returned part.
            ends = seq.logprob_text_ends
            num_listed = bisect.bisect_right(ends, seq.num_emitted_chars, lo=seq.num_emitted_logprobs)
            logprobs = seq.logprobs[seq.num_emitted_logprobs : num_listed]
            seq.num_emitted_logprobs = num_listed
        return CompletionOutput(
            index=seq.index,
            text=text,
            token_ids=new_tokens,
            logprobs=logprobs,
            finish_reason=str(seq.finish_reason) if seq.finish_reason else None,
            stop_reason=seq.stop_reason,
            num_generated_tokens=seq.num_generated_tokens,
        )

    def _fail(self, request_ids: set[str], exc: Exception) -> list[RequestOutput]:
        outputs = []
        for request_id in request_ids:
            out = self.abort_request(request_id)
            if out is not None:
                out.error = f"engine step failed: {type(exc).__name__}: {exc}"
                outputs.append(out)
        return outputs

    def stats(self) -> EngineStats:
        running = self.scheduler.running
        num_requests_running = len({seq.request for seq in running})
        # Siblings awaiting a fork are in neither scheduler queue (and never finished: a request
        # leaves self.requests when its last sequence finishes, and so do they).
        num_awaiting_fork = sum(
            seq.is_awaiting_fork
            for request in self.requests.values()
            if request.params.n > 1
            for seq in request.sequences
        )
        return EngineStats(
            num_requests_running=num_requests_running,
            num_requests_waiting=len(self.requests) - num_requests_running,
            num_seqs_running=len(running),
            num_seqs_waiting=len(self.scheduler.waiting) + num_awaiting_fork,
            num_kv_blocks_used=self.block_manager.num_used_blocks,
            num_kv_blocks_total=self.block_manager.num_blocks,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generated_tokens=self.num_generated_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_draft_tokens=self.speculator.num_draft_tokens,
            num_accepted_draft_tokens=self.speculator.num_accepted_tokens,
            num_prefix_queried_tokens=self.scheduler.num_prefix_queried_tokens,
            num_prefix_hit_tokens=self.scheduler.num_prefix_hit_tokens,
            num_weight_bytes=self.num_weight_bytes,
        )

