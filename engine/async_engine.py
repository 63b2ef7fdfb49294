"""AsyncEngine: the LLMEngine stepped on its own thread, fed and drained from asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Sequence

from engine.config import EngineConfig
from engine.errors import EngineDead, EngineOverloaded, RequestError
from engine.grammar import GrammarCompiler, GrammarError, GrammarSpec
from engine.llm_engine import LLMEngine
from engine.outputs import EngineStats, RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class AsyncEngine:
    """Requests go in through a thread-safe command queue; the engine thread steps the batch
    and hands each step's outputs back to the event loop, one call per step.

    The event loop never runs model code, so a long prefill cannot stall it. Leaving a
    `generate` iterator early (break, cancellation, client disconnect) aborts the request.

    NOTE: on CPU, oneDNN's bf16 kernels run ~2x slower when called from a thread other than
    the process's main thread (measured with torch 2.13 / libgomp). A server should therefore
    create the engine with `own_thread=False`, serve HTTP from another thread, and give the
    main thread to `run_forever()`; by default `start()` spawns an engine thread.
    """

    def __init__(self, config: EngineConfig, own_thread: bool = True) -> None:
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.model_name = self.engine.model_name
        self.max_model_len = self.engine.max_model_len
        self.generation_defaults = self.engine.generation_defaults
        # Thread-safe: compiles grammars for SamplingParams.grammar off the engine thread.
        self.grammar_compiler: GrammarCompiler = self.engine.grammar_compiler
        self.max_waiting = config.scheduler.max_waiting
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._not_started: set[str] = set()  # requests that have produced no output yet
        self._own_thread = own_thread
        self._thread: threading.Thread | None = None
        self._loop_ready = threading.Event()
        self._stopped = threading.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats = self.engine.stats()

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Called from the event loop: the engine loop starts (its own thread, or run_forever's)."""
        self._loop = asyncio.get_running_loop()
        if self._own_thread:
            self._thread = threading.Thread(target=self._run, name="kestrel-engine", daemon=True)
            self._thread.start()
        self._loop_ready.set()

    def run_forever(self, alongside: threading.Thread) -> None:
        """Run the engine loop in the calling thread until shutdown, or until `alongside` (the
        thread serving the event loop) ends without having started the engine."""
        self._thread = threading.current_thread()  # requests may queue before the loop starts
        while not self._loop_ready.wait(0.2):
            if not alongside.is_alive():
                return
        self._run(alongside)

    async def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._stopped.wait, 10)

    @property
    def is_alive(self) -> bool:
        return (
            self._thread is not None and not self._stopped.is_set() and not self._stopping
        )

    def stats(self) -> EngineStats:
        return self._stats

    # -- requests ---------------------------------------------------------------------------

    def add_requests(
        self, requests: Sequence[tuple[str, list[int], SamplingParams]]
    ) -> list[AsyncIterator[RequestOutput]]:
        """Queue `(request_id, prompt_token_ids, params)` requests, all of them or none: every check
        (EngineDead, a RequestError, EngineOverloaded when they would not all fit in the queue)
        runs before the first is queued. Returns each request's outputs; `abort(request_id)`, or
        closing its iterator before the end, aborts it before its next engine step."""
        if not self.is_alive:
            raise EngineDead("the engine is not running")
        for request_id, prompt_token_ids, params in requests:
            if request_id in self._streams:
                raise ValueError(f"duplicate request id {request_id!r}")
            self.engine.check_request(prompt_token_ids, params)
        num_waiting = len(self._not_started)
        if requests and num_waiting + len(requests) > self.max_waiting:
            raise EngineOverloaded(f"{num_waiting} requests are already waiting")
        outputs = []
        for request_id, prompt_token_ids, params in requests:
            stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
            self._streams[request_id] = stream
            self._not_started.add(request_id)
            self._commands.put(("add", request_id, list(prompt_token_ids), params))
            outputs.append(self._outputs(request_id, stream))
        self._wakeup.set()
        return outputs

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """One request's outputs; it is queued when the iteration starts, after a grammar spec
        is compiled (off the event loop, not on the engine thread)."""
        if isinstance(params.grammar, GrammarSpec):
            try:
                compiled = await asyncio.to_thread(self.grammar_compiler.compile, params.grammar)
            except GrammarError as exc:
                raise RequestError(f"invalid grammar: {exc}", param="grammar") from None
            params = dataclasses.replace(params, grammar=compiled)
        [outputs] = self.add_requests([(request_id, prompt_token_ids, params)])
        async with contextlib.aclosing(outputs):  # type: ignore[type-var]
            async for output in outputs:
                yield output

    async def _outputs(
        self, request_id: str, stream: asyncio.Queue[RequestOutput]
    ) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                output = await stream.get()
                finished = output.finished
                yield output
        finally:
            if finished:
                self._streams.pop(request_id, None)
                self._not_started.discard(request_id)
            else:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request (no effect once it has finished): the engine drops it before its next
        step, and its outputs are no longer delivered."""
        if self._streams.pop(request_id, None) is None:
            return
        self._not_started.discard(request_id)
        self._commands.put(("abort", request_id))
        self._wakeup.set()

    # -- engine thread ----------------------------------------------------------------------

    def _run(self, alongside: threading.Thread | None = None) -> None:
        try:
            while not self._stopping and (alongside is None or alongside.is_alive()):
                self._apply_commands()
                if not self.engine.has_unfinished_requests():
                    self._stats = self.engine.stats()
                    self._wakeup.wait(0.5)
                    self._wakeup.clear()
                    continue
                outputs = self.engine.step()
                self._stats = self.engine.stats()
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, outputs)
        except Exception:
            logger.exception("engine loop died")
            self._loop.call_soon_threadsafe(self._fail_all, "the engine loop stopped unexpectedly")
        finally:
            self._stopping = True
            self._stopped.set()

    def _apply_commands(self) -> None:
        outputs = []
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                _, request_id, prompt_token_ids, params = command
                try:
                    self.engine.add_request(request_id, prompt_token_ids, params)
                except Exception as exc:  # checked before queuing, so only a race gets here
                    outputs.append(RequestOutput(request_id, prompt_token_ids, [], True, str(exc)))
            else:
                output = self.engine.abort_request(command[1])
                if output is not None:
                    outputs.append(output)
        if outputs:
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    # -- event loop side --------------------------------------------------------------------

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            self._not_started.discard(output.request_id)
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put_nowait(output)

    def _fail_all(self, message: str) -> None:
        for request_id, stream in self._streams.items():
            stream.put_nowait(RequestOutput(request_id, [], [], finished=True, error=message))
