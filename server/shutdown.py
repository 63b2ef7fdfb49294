"""Shutdown an orchestrator can rely on: the first SIGTERM / SIGINT drains, a second one forces exit.

```
signal        stop accepting; in-flight requests run on
  + drain     every call still running ends with a 503: streams with an in-band error event and
              [DONE], others with the error body; the access log says status=503 aborted=shutdown
  + ~0.2 s    connections closed, engine stopped, process gone (exit code 0)
  + 0.9 s     watchdog: whatever is still running, the process exits (code 1)
```
A second SIGTERM / SIGINT at any point exits at once (code 128 + the signal's number).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

from .errors import SERVER_ERROR, APIError

logger = logging.getLogger("kestrel.server")

# The process exits at the latest this long after the drain timeout, whatever is still running.
WATCHDOG_MARGIN = 0.9
# uvicorn cancels the request tasks still running this long after the drain timeout: a backstop
# for a response the drain could not end (a client that stopped reading holds its last write).
UVICORN_MARGIN = 0.3
ABORTED = "shutdown"  # the access log's `aborted=` value for calls the drain ended


def shutdown_error() -> APIError:
    return APIError(
        503,
        "the server is shutting down and its drain timeout ended before this request finished; "
        "retry it on another instance",
        type=SERVER_ERROR,
        code="server_shutting_down",
    )


class Drain:
    """The app's side of a graceful shutdown.

    `begin(timeout)` may be called from any thread (a signal handler); once `timeout` seconds have
    passed, `abort_all` is called on the event loop with the shutdown error. Before the loop is
    bound (app start-up), a begun drain waits for it.
    """

    def __init__(self, abort_all: Callable[[APIError, str], int]) -> None:
        self._abort_all = abort_all
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timeout: float | None = None
        self._lock = threading.Lock()
        self.is_draining = False
        self.has_expired = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._loop = loop
            timeout = self._timeout
        if timeout is not None:
            loop.call_soon_threadsafe(self._schedule, timeout)

    def begin(self, timeout: float) -> None:
        with self._lock:
            if self._timeout is not None:
                return
            self._timeout = timeout
            loop = self._loop
        self.is_draining = True
        if loop is not None:
            loop.call_soon_threadsafe(self._schedule, timeout)

    def _schedule(self, timeout: float) -> None:
        assert self._loop is not None
        self._loop.call_later(timeout, self._expire)

    def _expire(self) -> None:
        if self.has_expired:
            return
        self.has_expired = True
        num_aborted = self._abort_all(shutdown_error(), ABORTED)
        if num_aborted:
            logger.warning("drain timeout: ending %d request(s) still in flight", num_aborted)


def force_exit(code: int, reason: str) -> None:
    """Exit now, from any thread, without waiting for anything but the log."""
    logger.warning("%s: exiting now (code %d)", reason, code)
    exit_now(code)


def exit_now(code: int) -> None:
    """Flush the log and leave, skipping the interpreter's teardown (torch's and its thread
    pools' take about a second, more on a busy host)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def install_signal_handlers(
    request_exit: Callable[[], None], drain: Drain, drain_timeout: float
) -> None:
    """SIGTERM / SIGINT: the first calls `request_exit` (stop serving), begins the drain and arms
    the watchdog; the second forces exit. Call from the main thread."""
    received: list[int] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if received:
            force_exit(128 + signum, f"second signal ({name}) during shutdown")
        received.append(signum)
        logger.info(
            "%s: shutting down; in-flight requests may finish for %.1f s "
            "(a second SIGTERM or SIGINT exits at once)", name, drain_timeout,
        )  # fmt: skip
        request_exit()
        drain.begin(drain_timeout)
        watchdog = threading.Timer(
            drain_timeout + WATCHDOG_MARGIN,
            force_exit,
            (1, f"shutdown still running {drain_timeout + WATCHDOG_MARGIN:.1f} s after {name}"),
        )
        watchdog.daemon = True
        watchdog.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)
