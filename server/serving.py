"""Chat / completions logic: prompts -> engine requests -> OpenAI JSON bodies or SSE chunks."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response

from engine import (
    AsyncEngine,
    RequestError,
    RequestOutput,
    SamplingParams,
    Tokenizer,
    TokenLogprob,
)

from .errors import APIError, bad_request, from_exception
from .limits import RequestLimits
from .metrics import Metrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    check_chat_supported,
    check_completion_supported,
    check_stream_options,
    messages_for_template,
    to_sampling_params,
    tools_for_template,
)
from .settings import ServerConfig
from .structured_outputs import GrammarService, grammar_param
from .tool_calls import ToolCalling, ToolPlan

logger = logging.getLogger("kestrel.serving")

# A streaming response starts once every engine request has produced its first output or this
# many seconds have passed; admission errors (400 / 429) arriving before then are HTTP errors.
ADMISSION_WAIT = 1.0
# Threads that parse, validate, render and tokenize requests off the event loop: two, so that one
# huge request does not hold up every other's preparation, and no more, so that they leave the
# engine its cores.
NUM_PREP_THREADS = 2
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MIN_LOGPROB = -9999.0  # -inf is not JSON
_TEMPLATE_RESERVED = (
    "messages",
    "tools",
    "add_generation_prompt",
    "documents",
    "continue_final_message",
    "add_special_tokens",
)

T = TypeVar("T")
_engine_request_ids = itertools.count()
_END = object()


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _sse_safe(text: str) -> str:
    # json.dumps escapes control characters but not these, which some clients treat as line ends.
    if "\u2028" in text or "\u2029" in text or "\x85" in text:
        text = (
            text.replace("\u2028", "\\u2028")
            .replace("\u2029", "\\u2029")
            .replace("\x85", "\\u0085")
        )
    return text


def json_response(body: Any, status: int = 200) -> Response:
    return Response(dumps(body).encode("utf-8"), status_code=status, media_type="application/json")


def _logprob(value: float) -> float:
    return max(MIN_LOGPROB, value)  # also maps NaN


# ---------------------------------------------------------------------------------------------
# Engine requests of one API call
# ---------------------------------------------------------------------------------------------


class RequestGroup:
    """The engine requests of one API call (one per prompt), merged into one stream of
    `(prompt_index, RequestOutput)`.

    The requests are admitted all together or not at all (the constructor raises the engine's
    refusal). Each one's outputs are drained by its own task; `close()` aborts the unfinished
    requests at once (the engine drops them before its next step, freeing their KV blocks) and
    cancels the tasks. An exception from a generator is re-raised to the consumer.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        prompts: list[list[int]],
        params: SamplingParams,
        api_id: str,
    ) -> None:
        self._pending: collections.deque[tuple[int, Any]] = collections.deque()
        self._ready = asyncio.Event()
        self._num_open = len(prompts)
        self._started = [False] * len(prompts)
        self._finished = [False] * len(prompts)
        self._engine = engine
        seq = next(_engine_request_ids)
        self._request_ids = [f"{api_id}-{seq}-{i}" for i in range(len(prompts))]
        outputs = engine.add_requests(
            [(request_id, prompt, params) for request_id, prompt in zip(self._request_ids, prompts)]
        )
        self._tasks = [
            asyncio.create_task(self._drain(i, generator)) for i, generator in enumerate(outputs)
        ]

    async def _drain(self, index: int, generator: AsyncIterator[RequestOutput]) -> None:
        try:
            try:
                async for output in generator:
                    self._push(index, output)
                self._finished[index] = True
            finally:
                await generator.aclose()  # type: ignore[attr-defined]
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            self._push(index, exc)
        self._push(index, _END)

    def _push(self, index: int, item: Any) -> None:
        self._pending.append((index, item))
        self._ready.set()

    async def _next(self) -> tuple[int, Any]:
        while not self._pending:
            self._ready.clear()
            await self._ready.wait()
        return self._pending.popleft()

    async def wait_admitted(self, timeout: float) -> None:
        """Return when each request has produced something or after `timeout`; raise its error."""
        deadline = time.monotonic() + timeout
        buffered = []
        try:
            while not all(self._started):
                while not self._pending:
                    self._ready.clear()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    try:
                        await asyncio.wait_for(self._ready.wait(), remaining)
                    except TimeoutError:
                        return
                index, item = self._pending.popleft()
                buffered.append((index, item))
                self._started[index] = True
                if isinstance(item, BaseException):
                    self.close()
                    raise item
        finally:
            self._pending.extendleft(reversed(buffered))

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self._num_open:
            index, item = await self._next()
            if item is _END:
                self._num_open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item

    def close(self) -> None:
        for request_id, finished in zip(self._request_ids, self._finished):
            if not finished:
                self._engine.abort(request_id)
        for task in self._tasks:
            task.cancel()

    def fail(self, exc: BaseException) -> None:
        """End the call with `exc`, ahead of any output not yet consumed; abort the requests."""
        self.close()
        self._pending.appendleft((0, exc))
        self._ready.set()


# ---------------------------------------------------------------------------------------------
# Per-choice accumulation
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Choice:
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text_offset: int = 0  # characters emitted so far (completions logprobs)


@dataclass(slots=True)
class _Timing:
    """Latency metrics of one API call, observed as outputs arrive."""

    metrics: Metrics
    start: float
    last: float | None = None

    def output(self, has_tokens: bool) -> None:
        if not has_tokens:
            return
        now = time.perf_counter()
        if self.last is None:
            self.metrics.time_to_first_token.observe(now - self.start)
        else:
            self.metrics.inter_token_latency.observe(now - self.last)
        self.last = now


# ---------------------------------------------------------------------------------------------
# Token strings for logprobs
# ---------------------------------------------------------------------------------------------


def _byte_level_alphabet() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> printable character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenText:
    """Each token's bytes and text as logprobs report them (cached per id)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        decoder = tokenizer.backend.decoder
        self._alphabet = _byte_level_alphabet() if type(decoder).__name__ == "ByteLevel" else None

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one instance per app, ids are bounded
    def token_bytes(self, token_id: int) -> bytes:
        token = self._tokenizer.convert_ids_to_tokens(token_id)
        if token is None:
            return b""
        if self._alphabet is not None:
            try:
                return bytes(self._alphabet[ch] for ch in token)
            except KeyError:
                return token.encode("utf-8")  # an added token outside the alphabet
        m = _BYTE_TOKEN.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace("\u2581", " ").encode("utf-8")

    def text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------


class Serving:
    """The OpenAI endpoints' logic over one engine."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig, metrics: Metrics) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.tokenizer: Tokenizer = engine.tokenizer
        self.max_model_len: int = engine.max_model_len
        self.model_name = config.served_model_name or engine.model_name
        self.model_names = list(dict.fromkeys([self.model_name, *config.model_aliases]))
        self.created = int(time.time())
        # Request values win over these; these win over SamplingParams' (OpenAI's) defaults.
        server_defaults = dict(config.sampling_defaults)
        self.default_max_tokens: int | None = server_defaults.pop("max_tokens", None)
        self.sampling_defaults = {**(engine.generation_defaults or {}), **server_defaults}
        self.token_text = TokenText(self.tokenizer)
        self.grammars = GrammarService(engine.grammar_compiler, config.grammar_compile_timeout)
        self.tool_calling = ToolCalling(self.tokenizer, config.tool_call_parser)
        self.limits = RequestLimits(
            max_prompts=config.max_prompts,
            max_messages=config.max_messages,
            max_content_parts=config.max_content_parts,
            max_logit_bias=config.max_logit_bias,
            max_token_ids=config.max_token_ids,
            max_waiting=engine.max_waiting,
        )
        self._prep = ThreadPoolExecutor(NUM_PREP_THREADS, thread_name_prefix="kestrel-prep")
        backend = self.tokenizer.backend
        max_token_chars = max((len(t) for t in backend.get_vocab()), default=1)
        self._max_prompt_chars_per_token = max_token_chars * (
            1 if backend.normalizer is None else 4
        )
        # The first render compiles the template (~0.6 s holding the GIL): not in a request.
        with contextlib.suppress(Exception):
            self.tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
        self._calls: set[_Call] = set()  # calls whose engine requests are in flight
        self._closed_with: APIError | None = None

    def abort_all(self, error: APIError, reason: str) -> int:
        """End every call in flight with `error` (a stream: an in-band error event, then [DONE]),
        logged as `aborted=<reason>`; calls that start later get `error` at once. Returns how
        many calls were ended."""
        self._closed_with = error
        calls = list(self._calls)
        for call in calls:
            call.abort(error, reason)
        return len(calls)

    # -- models -------------------------------------------------------------------------------

    def resolve_model(self, name: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        if name is None or name == "":
            return self.model_name
        if name not in self.model_names:
            raise APIError(
                404,
                f"The model {name!r} does not exist; this server serves: {', '.join(self.model_names)}",
                param="model",
                code="model_not_found",
            )
        return name

    def model_card(self, name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "kestrel",
            "root": self.engine.model_name,
            "parent": None,
            "max_model_len": self.max_model_len,
        }

    def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card(name) for name in self.model_names]}

    # -- tokenization -------------------------------------------------------------------------

    async def off_loop(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) on a preparation thread: the event loop only moves requests in and
        deltas out."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prep, functools.partial(fn, *args, **kwargs))

    async def _chat_prompt(
        self,
        request: ChatCompletionRequest | TokenizeRequest,
        add_special_tokens: bool = False,
    ) -> list[int]:
        return await self.off_loop(self._encode_chat, request, add_special_tokens)

    def _encode_chat(
        self, request: ChatCompletionRequest | TokenizeRequest, add_special_tokens: bool
    ) -> list[int]:
        assert request.messages is not None
        messages = messages_for_template(request.messages)
        # tool_choice "none": the model is not told of tools it may not call.
        tools = None if getattr(request, "tool_choice", None) == "none" else tools_for_template(request.tools)
        kwargs = {
            k: v
            for k, v in (request.chat_template_kwargs or {}).items()
            if k not in _TEMPLATE_RESERVED
        }
        # encode_chat is the one path to a chat's token ids: only the template's markup becomes
        # special tokens, client strings stay text.
        return self.tokenizer.encode_chat(
            messages,
            tools,
            request.add_generation_prompt and not request.continue_final_message,
            continue_final_message=request.continue_final_message,
            add_special_tokens=add_special_tokens,
            **kwargs,
        )

    def _check_prompt_chars(self, text: str) -> None:
        """400 context_length_exceeded, without tokenizing, for a text too long to ever fit: no
        token spans more than `max_token_chars` characters (times a slack for a normalizer that
        may shorten the text first)."""
        min_tokens = len(text) // self._max_prompt_chars_per_token
        if min_tokens > self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"your prompt of {len(text)} characters has at least {min_tokens} tokens. Please "
                "reduce the length of the prompt.",
                param="prompt",
                code="context_length_exceeded",
            )

    def _check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.tokenizer.vocab_size
        for token_id in ids:
            if not 0 <= token_id < vocab:
                raise bad_request(
                    f"token id {token_id} is out of range [0, {vocab})",
                    param=param,
                    code="invalid_value",
                )

    def _check_context(
        self, prompt_len: int, params: SamplingParams, param: str, *, max_tokens_given: bool
    ) -> None:
        """400 context_length_exceeded unless prompt + max_tokens fits; a max_tokens that came
        from the defaults (not the request) is shortened to fit instead."""
        limit = self.max_model_len
        if not max_tokens_given and params.max_tokens is not None and prompt_len < limit:
            params.max_tokens = min(params.max_tokens, limit - prompt_len)
        requested = prompt_len + (params.max_tokens or 1)
        if requested > limit:
            max_tokens = params.max_tokens or 0
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{requested} tokens ({prompt_len} in the {param}, {max_tokens} in the completion). "
                f"Please reduce the length of the {param} or completion.",
                param=param,
                code="context_length_exceeded",
            )

    async def tokenize(self, request: TokenizeRequest) -> dict[str, Any]:
        self.resolve_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise bad_request("give exactly one of prompt or messages", param="prompt")
        return await self.off_loop(self._tokenize, request)

    def _tokenize(self, request: TokenizeRequest) -> dict[str, Any]:
        if request.messages is not None:
            ids = self._encode_chat(request, bool(request.add_special_tokens))
        else:
            assert request.prompt is not None
            add_special = True if request.add_special_tokens is None else request.add_special_tokens
            ids = self.tokenizer.encode(request.prompt, add_special)
        body: dict[str, Any] = {
            "count": len(ids),
            "max_model_len": self.max_model_len,
            "tokens": ids,
        }
        body["token_strs"] = (
            self.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        )
        return body

    async def detokenize(self, request: DetokenizeRequest) -> dict[str, Any]:
        self.resolve_model(request.model)
        return await self.off_loop(self._detokenize, request)

    def _detokenize(self, request: DetokenizeRequest) -> dict[str, Any]:
        self._check_token_ids(request.tokens, "tokens")
        return {"prompt": self.tokenizer.decode(request.tokens, skip_special_tokens=False)}

    # -- chat ---------------------------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest, raw: Request) -> Response:
        model = self.resolve_model(request.model)
        check_chat_supported(request)
        check_stream_options(request)
        params = to_sampling_params(
            request, self.sampling_defaults, default_max_tokens=self.default_max_tokens
        )
        tools = self.tool_calling.plan(request)
        if tools is not None and tools.keeps_special_tokens and request.skip_special_tokens is None:
            params.skip_special_tokens = False
        ask = tools.grammar if tools else None
        params.grammar = await self.grammars.compile(request, ask)
        prompt = await self._chat_prompt(request)
        given = request.max_completion_tokens is not None or request.max_tokens is not None
        self._check_context(len(prompt), params, "messages", max_tokens_given=given)
        call = _Call(self, raw, "chatcmpl", model, [prompt], params, "messages",
                     grammar_param(request, ask) if params.grammar else None)  # fmt: skip
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return await call.stream(self._chat_chunks(call, include_usage, tools))
        choices = await call.collect()
        messages = [
            tools.message("".join(c.text), c.finish_reason) if tools
            else ({"role": "assistant", "content": "".join(c.text)}, c.finish_reason)
            for c in choices
        ]  # fmt: skip
        return json_response(
            {
                "id": call.api_id,
                "object": "chat.completion",
                "created": call.created,
                "model": model,
                "choices": [
                    {
                        "index": i,
                        "message": messages[i][0],
                        "logprobs": self._chat_logprobs(c.logprobs)
                        if params.logprobs is not None
                        else None,
                        "finish_reason": messages[i][1],
                        "stop_reason": c.stop_reason,
                    }
                    for i, c in enumerate(choices)
                ],
                "usage": call.usage(),
                "system_fingerprint": None,
                **({"prompt_logprobs": self._prompt_logprobs(call, 0)} if request.prompt_logprobs is not None else {}),
            }
        )

    def _chat_logprobs(self, logprobs: list[TokenLogprob] | None) -> dict[str, Any]:
        return {"content": [self._chat_logprob(lp) for lp in logprobs or ()], "refusal": None}

    def _chat_logprob(self, lp: TokenLogprob) -> dict[str, Any]:
        tt = self.token_text
        raw = tt.token_bytes(lp.token_id)
        return {
            "token": tt.text(lp.token_id),
            "logprob": _logprob(lp.logprob),
            "bytes": list(raw),
            "top_logprobs": [
                {"token": tt.text(tid), "logprob": _logprob(v), "bytes": list(tt.token_bytes(tid))}
                for tid, v in lp.top
            ],
        }

    async def _chat_chunks(
        self, call: _Call, include_usage: bool, tools: ToolPlan | None
    ) -> AsyncIterator[str]:
        head = f'{{"id":{dumps(call.api_id)},"object":"chat.completion.chunk","created":{call.created},"model":{dumps(call.model)},"choices":['
        tail = ',"usage":null}' if include_usage else "}"
        want_logprobs = call.params.logprobs is not None

        def chunk(
            index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None
        ) -> str:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = call.choices[index].stop_reason
            return _sse_safe(head + dumps(choice) + "]" + tail)

        for i in range(call.params.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        streams = [tools.stream() for _ in call.choices] if tools else None
        held: list[list[TokenLogprob]] = [[] for _ in call.choices]  # logprobs of held-back text
        async with contextlib.aclosing(call.deltas()) as deltas:
            async for index, delta in deltas:
                if streams is not None:  # content and tool-call deltas; logprobs ride on the next
                    held[index] += delta.logprobs or ()
                    finish = delta.finish_reason
                    for part in streams[index].feed(delta.text, finish is not None):
                        logprobs = self._chat_logprobs(held[index]) if want_logprobs else None
                        held[index] = []
                        yield chunk(index, part, logprobs=logprobs)
                    if finish is not None:
                        logprobs = self._chat_logprobs(held[index]) if want_logprobs and held[index] else None
                        yield chunk(index, {}, streams[index].finish_reason(finish), logprobs)
                    continue
                if delta.text or (want_logprobs and delta.logprobs):
                    logprobs = self._chat_logprobs(delta.logprobs) if want_logprobs else None
                    yield chunk(index, {"content": delta.text}, logprobs=logprobs)
                if delta.finish_reason is not None:
                    yield chunk(index, {}, finish=delta.finish_reason)
        if include_usage:
            yield _sse_safe(head + "]" + f',"usage":{dumps(call.usage())}}}')

    # -- completions --------------------------------------------------------------------------

    async def completion(self, request: CompletionRequest, raw: Request) -> Response:
        model = self.resolve_model(request.model)
        check_completion_supported(request)
        check_stream_options(request)
        params = to_sampling_params(
            request,
            self.sampling_defaults,
            default_max_tokens=self.default_max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS,
        )
        params.grammar = await self.grammars.compile(request)
        prompts, prompt_texts = await self.off_loop(self._completion_prompts, request)
        longest = max(len(prompt) for prompt in prompts)
        given = request.max_tokens is not None
        self._check_context(longest, params, "prompt", max_tokens_given=given)
        call = _Call(self, raw, "cmpl", model, prompts, params, "prompt",
                     grammar_param(request) if params.grammar else None)  # fmt: skip
        echo = prompt_texts if request.echo else None
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return await call.stream(self._completion_chunks(call, include_usage, echo))
        choices = await call.collect()
        n = params.n
        body_choices = []
        for i, c in enumerate(choices):
            prefix = echo[i // n] if echo else ""
            text = prefix + "".join(c.text)
            logprobs = None
            if params.logprobs is not None:
                logprobs = self._completion_logprobs(c.logprobs, len(prefix))
                if echo:
                    logprobs = self._echo_logprobs(call, i // n, logprobs)
            choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason,
                      "stop_reason": c.stop_reason}  # fmt: skip
            if request.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self._prompt_logprobs(call, i // n)
            body_choices.append(choice)
        return json_response(
            {
                "id": call.api_id,
                "object": "text_completion",
                "created": call.created,
                "model": model,
                "choices": body_choices,
                "usage": call.usage(),
                "system_fingerprint": None,
            }
        )

    def _completion_prompts(self, request: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        prompt = request.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise bad_request("prompt must not be empty", param="prompt")
        prompts: list[list[int]] = []
        texts: list[str] = []
        if isinstance(prompt[0], str):
            for text in prompt:
                self._check_prompt_chars(text)
            for text in prompt:
                ids = self.tokenizer.encode(text, request.add_special_tokens)
                prompts.append(ids)
                texts.append(text)
        else:
            prompts = [prompt] if isinstance(prompt[0], int) else prompt  # type: ignore[list-item]
            for ids in prompts:
                self._check_token_ids(ids, "prompt")
            texts = (
                [self.tokenizer.decode(ids, skip_special_tokens=False) for ids in prompts]
                if request.echo
                else []
            )
        for ids in prompts:
            if not ids:
                raise bad_request("prompt must not be empty (it has no tokens)", param="prompt")
        return prompts, texts

    def _completion_logprobs(
        self, logprobs: list[TokenLogprob] | None, offset: int
    ) -> dict[str, Any]:
        tt = self.token_text
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for lp in logprobs or ():
            text = tt.text(lp.token_id)
            tokens.append(text)
            token_logprobs.append(_logprob(lp.logprob))
            top_logprobs.append(
                {tt.text(tid): _logprob(v) for tid, v in lp.top} if lp.top else None
            )
            text_offset.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        }

    def _echo_logprobs(self, call: _Call, prompt_index: int, completion: dict[str, Any]) -> dict[str, Any]:
        """Completions logprobs with the echoed prompt's tokens first, as OpenAI lists them:
        the first prompt token has no logprob; `completion` follows."""
        ids = call.prompts[prompt_index]
        scored = call.prompt_logprobs[prompt_index] or [None] * len(ids)
        prompt = self._completion_logprobs([lp for lp in scored if lp is not None], 0)
        first = self.token_text.text(ids[0])
        prompt["tokens"].insert(0, first)
        prompt["token_logprobs"].insert(0, None)
        prompt["top_logprobs"].insert(0, None)
        prompt["text_offset"] = [0] + [offset + len(first) for offset in prompt["text_offset"]]
        return {key: prompt[key] + completion[key] for key in prompt}

    def _prompt_logprobs(self, call: _Call, prompt_index: int) -> list[dict[str, Any] | None]:
        """vLLM's `prompt_logprobs`: per prompt token (None for the first), the token itself and
        the top k, each as {token id: {logprob, rank, decoded_token}}."""
        out: list[dict[str, Any] | None] = []
        for lp in call.prompt_logprobs[prompt_index] or []:
            if lp is None:
                out.append(None)
                continue
            entries = {lp.token_id: (lp.logprob, lp.rank)}
            for rank, (token_id, logprob) in enumerate(lp.top, start=1):
                entries.setdefault(token_id, (logprob, rank))
            out.append({
                str(token_id): {"logprob": _logprob(logprob), "rank": rank,
                                "decoded_token": self.token_text.text(token_id)}
                for token_id, (logprob, rank) in entries.items()
            })  # fmt: skip
        return out

    async def _completion_chunks(
        self, call: _Call, include_usage: bool, echo: list[str] | None
    ) -> AsyncIterator[str]:
        head = f'{{"id":{dumps(call.api_id)},"object":"text_completion","created":{call.created},"model":{dumps(call.model)},"choices":['
        tail = ',"usage":null}' if include_usage else "}"
        want_logprobs = call.params.logprobs is not None
        n = call.params.n

        def chunk(index: int, text: str, finish: str | None = None, logprobs: Any = None) -> str:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = call.choices[index].stop_reason
            return _sse_safe(head + dumps(choice) + "]" + tail)

        # With logprobs the echo waits for the engine's scores of the prompt (its first output).
        echo_pending = set(range(len(call.choices))) if echo else set()
        if echo and not want_logprobs:
            for i in range(len(call.choices)):
                yield chunk(i, echo[i // n])
            echo_pending.clear()
        async with contextlib.aclosing(call.deltas()) as deltas:
            async for index, delta in deltas:
                if index in echo_pending:
                    echo_pending.discard(index)
                    prompt = self._echo_logprobs(call, index // n, self._completion_logprobs([], 0))
                    call.choices[index].text_offset = len(echo[index // n])
                    yield chunk(index, echo[index // n], logprobs=prompt)
                logprobs = None
                if want_logprobs:
                    choice = call.choices[index]
                    logprobs = self._completion_logprobs(delta.logprobs, choice.text_offset)
                    choice.text_offset += sum(len(t) for t in logprobs["tokens"])
                if (
                    delta.text
                    or delta.finish_reason is not None
                    or (want_logprobs and delta.logprobs)
                ):
                    yield chunk(index, delta.text, delta.finish_reason, logprobs)
        if include_usage:
            yield _sse_safe(head + "]" + f',"usage":{dumps(call.usage())}}}')


@dataclass(slots=True)
class _Delta:
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None


class _Call:
    """One chat or completions call: its engine requests, choices, usage, metrics and log fields."""

    def __init__(
        self,
        serving: Serving,
        raw: Request,
        kind: str,
        model: str,
        prompts: list[list[int]],
        params: SamplingParams,
        prompt_param: str,
        grammar_param: str | None = None,
    ) -> None:
        self.serving = serving
        self.raw = raw
        state = raw.scope.setdefault("state", {})
        self.state = state
        request_id = state.get("request_id") or ""
        self.api_id = f"{kind}-{request_id}"
        self.created = int(time.time())
        self.model = model
        self.prompts = prompts
        self.params = params
        self.prompt_param = prompt_param
        self.grammar_param = grammar_param  # the field that asked for a structured output
        self.choices = [_Choice() for _ in range(len(prompts) * params.n)]
        self.num_prompt_tokens = sum(len(p) for p in prompts)
        self.num_cached_tokens = [0] * len(prompts)  # per prompt, from the prefix cache
        # prompt_logprobs: per prompt, once the engine has scored it
        self.prompt_logprobs: list[list[TokenLogprob | None] | None] = [None] * len(prompts)
        self.timing = _Timing(serving.metrics, state.get("start_time") or time.perf_counter())
        self.group: RequestGroup | None = None
        self._recorded = False
        self._has_output = False
        state["prompt_tokens"] = self.num_prompt_tokens

    def _start(self) -> RequestGroup:
        if self.serving._closed_with is not None:
            raise self.serving._closed_with
        try:
            self.group = RequestGroup(self.serving.engine, self.prompts, self.params, self.api_id)
        except RequestError as exc:
            raise self._prompt_error(exc) from None
        self.serving._calls.add(self)
        return self.group

    def abort(self, error: APIError, reason: str) -> None:
        """End the call with `error` (see Serving.abort_all)."""
        self.state["aborted"] = reason
        if self.group is not None:
            self.group.fail(error)

    def usage(self) -> dict[str, Any]:
        completion = sum(c.num_tokens for c in self.choices)
        return {
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.num_prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": sum(self.num_cached_tokens)},
        }

    async def deltas(self) -> AsyncIterator[tuple[int, _Delta]]:
        """Each choice's new text as it arrives; records metrics when the call ends."""
        assert self.group is not None
        n = self.params.n
        try:
            async for prompt_index, output in self.group:
                if output.error:
                    raise self._engine_error(output)
                self._has_output = True
                self.num_cached_tokens[prompt_index] = output.num_cached_tokens
                if output.prompt_logprobs is not None:
                    self.prompt_logprobs[prompt_index] = output.prompt_logprobs
                self.timing.output(any(o.token_ids for o in output.outputs))
                for out in output.outputs:
                    index = prompt_index * n + out.index
                    choice = self.choices[index]
                    choice.num_tokens = max(choice.num_tokens, out.num_generated_tokens)
                    if out.finish_reason is not None:
                        choice.finish_reason = out.finish_reason
                        choice.stop_reason = out.stop_reason
                    yield index, _Delta(out.text, out.logprobs, out.finish_reason)
            self._record(finished=True)
        except RequestError as exc:
            raise self._prompt_error(exc) from None
        finally:
            self._record(finished=False)
            self.group.close()
            self.serving._calls.discard(self)

    def _engine_error(self, output: RequestOutput) -> APIError:
        if output.grammar_failed:  # the request's grammar, which no output of the model can match
            return APIError(
                400,
                f"{output.error}: the model cannot produce output the structured output allows "
                "(it may need a character this model's vocabulary cannot spell, or be too complex)",
                param=self.grammar_param,
                code="structured_output_failed",
            )
        return APIError(500, f"the engine failed the request: {output.error}",
                        type="server_error", code="engine_error")  # fmt: skip

    def _prompt_error(self, exc: RequestError) -> APIError:
        """An engine refusal, naming the prompt as this endpoint calls it (messages / prompt)."""
        param = self.prompt_param if exc.param in ("prompt", "messages") else exc.param
        return APIError(400, str(exc), param=param, code=exc.code)

    def _record(self, finished: bool) -> None:
        if self._recorded:
            return
        self._recorded = True
        usage = self.usage()
        self.state["completion_tokens"] = usage["completion_tokens"]
        if not self._has_output:
            return  # refused or gone before the engine did anything
        metrics = self.serving.metrics
        metrics.prompt_tokens.inc(usage["prompt_tokens"])
        metrics.generation_tokens.inc(usage["completion_tokens"])
        if finished:
            metrics.e2e_latency.observe(time.perf_counter() - self.timing.start)
            for choice in self.choices:
                metrics.finished.labels(choice.finish_reason or "unknown").inc()

    async def collect(self) -> list[_Choice]:
        """Run to completion; abort if the client disconnects first."""
        self._start()

        async def run() -> None:
            async with contextlib.aclosing(self.deltas()) as deltas:
                async for index, delta in deltas:
                    choice = self.choices[index]
                    if delta.text:
                        choice.text.append(delta.text)
                    if delta.logprobs:
                        choice.logprobs.extend(delta.logprobs)

        work = asyncio.create_task(run())
        watch = asyncio.create_task(_wait_for_disconnect(self.raw))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
        if not work.done() or work.cancelled():
            with contextlib.suppress(asyncio.CancelledError):
                await work
            raise ClientDisconnected()
        work.result()  # re-raises the call's error
        return self.choices

    async def stream(self, chunks: AsyncGenerator[str, None]) -> Response:
        """An SSE response of `chunks`, started once the engine admitted the requests."""
        group = self._start()
        try:
            await group.wait_admitted(ADMISSION_WAIT)
        except RequestError as exc:
            raise self._prompt_error(exc) from None
        except BaseException:
            group.close()
            self.serving._calls.discard(self)
            raise
        config = self.serving.config
        return EventSourceResponse(
            _with_error_and_done(chunks, group, config.retry_after, self.state),
            ping=config.sse_ping_interval,
            sep="\n",
            ping_message_factory=lambda: ServerSentEvent(comment="ping", sep="\n"),
            headers={"Cache-Control": "no-cache"},
        )


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _with_error_and_done(
    chunks: AsyncGenerator[str, None],
    group: RequestGroup,
    retry_after: int,
    state: dict[str, Any],
) -> AsyncIterator[str]:
    """SSE data lines: the chunks, an in-band error if one occurs (noted in `state` for the access
    log), then [DONE]."""
    try:
        async for chunk in chunks:
            yield chunk
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        error = from_exception(exc, retry_after=retry_after)
        state["in_band_error"] = error
        if error.status >= 500 and "aborted" not in state:
            logger.error("stream failed: %s", exc, exc_info=not isinstance(exc, APIError))
        yield dumps(error.body())
    finally:
        group.close()
        await chunks.aclose()  # runs the call's bookkeeping now, not when garbage-collected
    yield "[DONE]"
