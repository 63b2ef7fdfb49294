"""`python -m server`: CLI -> load config -> build engine -> uvicorn."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Sequence

import uvicorn

from .logs import EscapeFilter
from .settings import (
    SettingsError,
    build_configs,
    build_ray_config,
    format_config,
    resolve_values,
)
from .shutdown import UVICORN_MARGIN, exit_now, install_signal_handlers

logger = logging.getLogger("kestrel.server")


# "brief": libgomp's spin-then-sleep with a short spin. The waits between the parallel parts of
# a step are microseconds, so a short spin catches nearly all of them, and a thread whose partner
# was preempted by a busy neighbour soon sleeps and yields the core. SmolLM2 Q4_1, 2 threads, tok/s
# at 1 / 16 sequences (benchmarks/steady_step.py): quiet host, brief 111 / 395, passive 48 / 301,
# active 104 / 436, libgomp's default (300,000 spins) 110 / 435; with 6 busy processes on the 2
# cores, brief 10 / 49, passive 14 / 59, active 3 / 22, libgomp's default 3 / 10.
BRIEF_SPIN_COUNT = "10000"


def set_thread_wait_policy(policy: str) -> None:
    """How idle OpenMP threads wait; what the environment already says wins."""
    if policy == "brief":
        if "OMP_WAIT_POLICY" not in os.environ:
            os.environ.setdefault("GOMP_SPINCOUNT", BRIEF_SPIN_COUNT)
    else:
        os.environ.setdefault("OMP_WAIT_POLICY", policy.upper())


def main(argv: Sequence[str] | None = None) -> int:
    try:
        values = resolve_values(env=os.environ, argv=sys.argv[1:] if argv is None else argv)
        engine_config, server_config = build_configs(values)
        ray_config = build_ray_config(values)
    except SettingsError as exc:
        print(f"kestrel: {exc}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(EscapeFilter())  # every record, ours and uvicorn's: one line each
    logging.basicConfig(
        level=server_config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[handler],
    )
    print("kestrel: effective configuration\n" + format_config(values), file=sys.stderr, flush=True)
    if ray_config.is_enabled:
        try:
            from .ray_serve import run
        except ImportError as exc:
            print(f"kestrel: --replicas needs Ray Serve ({exc}); pip install -e '.[ray]'",
                  file=sys.stderr)  # fmt: skip
            return 2
        return run(values)

    # Read once, when torch loads OpenMP: hence here, before the engine's first import.
    set_thread_wait_policy(server_config.thread_wait_policy)
    from engine import AsyncEngine

    try:
        engine = AsyncEngine(engine_config, own_thread=False)
    except Exception as exc:  # an unknown model, a bad directory, an unsupported architecture
        logger.debug("engine failed to start", exc_info=True)
        print(f"kestrel: cannot load model {engine_config.model!r}: {exc}", file=sys.stderr)
        return 1

    from .app import create_app

    app = create_app(engine, server_config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=server_config.host,
            port=server_config.port,
            log_config=None,  # keep the logging set up above
            log_level=server_config.log_level,
            access_log=False,  # the app logs one structured line per request
            # A backstop only: the app's drain (server/shutdown.py) ends every call in time.
            timeout_graceful_shutdown=server_config.drain_timeout + UVICORN_MARGIN,
            lifespan="on",
        )
    )
    # HTTP runs on a second thread and the engine loop on this one, where the CPU kernels are
    # fastest (see AsyncEngine). uvicorn installs no signal handlers off the main thread, so a
    # SIGTERM / SIGINT here asks it to shut down gracefully: stop accepting, drain (the app ends
    # what is still running when drain_timeout ends), then stop the engine through the app's
    # lifespan. A second signal, or the watchdog, exits at once.
    def request_exit() -> None:
        server.should_exit = True

    install_signal_handlers(request_exit, app.state.drain, server_config.drain_timeout)
    http = threading.Thread(target=server.run, name="kestrel-http")
    http.start()
    engine.run_forever(alongside=http)
    http.join()
    return 0 if server.started else 1


if __name__ == "__main__":
    exit_now(main())
