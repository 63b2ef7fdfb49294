"""Kestrel on Ray Serve: N engine replicas behind Ray Serve's HTTP proxy, routed by prompt prefix.

```
client -> Ray Serve HTTP proxy (host:port, one per node)
       -> KestrelIngress    reads the body, hashes the prompt's leading chunks; no model, 0 CPUs
       -> PrefixAffinityRouter (in the ingress's handle): the replica that served the prefix,
                            unless it is busy; else power of two choices on ongoing requests
       -> KestrelReplica    create_app(engine), the same FastAPI app as `python -m server`,
                            driven with the buffered body; its ASGI messages stream back
```

Only the ingress sees a request's body before a replica is chosen (Ray's proxy routes on the
headers alone), so the router works on the prefix hashes the ingress attaches to each call.
Imports Ray at import time; `python -m server` imports this module only with `replicas > 0`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)
from starlette.types import Message, Receive, Scope, Send

from .errors import SERVER_ERROR, APIError, from_exception
from .logs import EscapeFilter
from .prefix_affinity import AffinityTable, prefix_hashes, prompt_text
from .settings import RayConfig, ServerConfig, build_configs, build_ray_config

logger = logging.getLogger("kestrel.ray")

APP_NAME = "kestrel"
REPLICA_DEPLOYMENT = "KestrelReplica"
INGRESS_DEPLOYMENT = "KestrelIngress"
REPLICA_HEADER = "x-kestrel-replica"  # names the replica that answered (its Ray Serve replica id)
REPO_ROOT = Path(__file__).resolve().parent.parent
METRICS_INTERVAL_S = 5.0  # how often a replica copies its Prometheus samples into Ray's metrics
_POW2_ROUTER = "ray.serve._private.request_router.pow_2_router:PowerOfTwoChoicesRequestRouter"
# The scope keys a replica needs; the rest (Ray's state, the proxy's extensions) stay behind.
_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path",
               "query_string", "headers", "client", "server")  # fmt: skip


def replica_actor_name(replica: str) -> str:
    """The Ray actor name of the replica an `x-kestrel-replica` header names (for ray.get_actor
    in the "serve" namespace)."""
    return f"SERVE_REPLICA::{APP_NAME}#{REPLICA_DEPLOYMENT}#{replica}"


@dataclass(frozen=True, slots=True)
class HTTPCall:
    """One HTTP request as the ingress hands it to a replica."""

    scope: dict[str, Any]  # the ASGI scope, portable keys only (_SCOPE_KEYS)
    body: bytes  # the whole body, or its first max_request_bytes + 1 (the replica answers 413)
    prefix_hashes: tuple[int, ...]  # see prefix_affinity.prefix_hashes; () without a prompt


# ---------------------------------------------------------------------------------------------
# Replica: one engine, the FastAPI app
# ---------------------------------------------------------------------------------------------


class KestrelReplica:
    """One engine and the app `python -m server` serves, run on the calls the ingress forwards.

    NOTE: the engine steps on a thread of its own: a Ray actor's main thread belongs to Ray.
    """

    async def __init__(self, values: dict[str, Any]) -> None:
        from engine import AsyncEngine

        from .app import create_app

        engine_config, server_config = build_configs(values)
        _configure_logging(server_config)
        self.name = serve.get_replica_context().replica_id.unique_id
        self._name_header = (REPLICA_HEADER.encode(), self.name.encode())
        self.engine = AsyncEngine(engine_config, own_thread=True)
        self.app = create_app(self.engine, server_config)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # starts the engine loop
        self._metrics = _RayMetricsBridge(self.app.state.metrics.registry, self.name)
        self._metrics_task = asyncio.create_task(self._export_metrics())
        logger.info("replica %s serves %s", self.name, self.engine.model_name)

    async def _export_metrics(self) -> None:
        while True:
            try:
                self._metrics.update()
            except Exception:  # metrics must never take the replica down
                logger.exception("exporting metrics to Ray failed")
            await asyncio.sleep(METRICS_INTERVAL_S)

    async def handle(self, call: HTTPCall) -> AsyncIterator[list[Message]]:
        """Run the app on `call`; yield its ASGI messages, as many at a time as are ready.
        Closing the generator (the client left, the ingress was cancelled) is a disconnect."""
        outbox: asyncio.Queue[Message | None] = asyncio.Queue()
        disconnected = asyncio.Event()
        body_sent = False

        async def receive() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": call.body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self._name_header]}
            outbox.put_nowait(message)

        async def run() -> None:
            try:
                await self.app(dict(call.scope), receive, send)
            finally:
                outbox.put_nowait(None)

        task = asyncio.create_task(run())
        try:
            while True:
                batch = [await outbox.get()]
                while not outbox.empty():
                    batch.append(outbox.get_nowait())
                done = batch[-1] is None
                if done:
                    batch.pop()
                if batch:
                    yield batch
                if done:
                    return
        finally:
            disconnected.set()
            if not task.done():
                task.cancel()  # the engine request is aborted as its generator closes

    def check_health(self) -> None:
        """Ray Serve's health check: the engine loop must be running."""
        if not self.engine.is_alive:
            raise RuntimeError(f"replica {self.name}: the engine loop has stopped")

    async def __del__(self) -> None:
        self._metrics_task.cancel()
        await self._lifespan.__aexit__(None, None, None)  # stops the engine loop


class _RayMetricsBridge:
    """Mirrors one replica's Prometheus samples (what its /metrics shows) into Ray gauges of the
    same names plus a `replica` tag, which every node's Ray metrics agent exports for Prometheus
    (as `ray_<name>`). Counters and histogram buckets become gauges holding their running totals,
    so rate() and histogram_quantile() work on them as usual."""

    def __init__(self, registry: Any, replica: str) -> None:
        self._registry = registry
        self._replica = replica
        self._gauges: dict[str, Any] = {}

    def update(self) -> None:
        from ray.util.metrics import Gauge

        for family in self._registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # prometheus_client's creation timestamps
                gauge = self._gauges.get(sample.name)
                if gauge is None:
                    gauge = Gauge(sample.name, description=family.documentation or sample.name,
                                  tag_keys=("replica", *sorted(sample.labels)))  # fmt: skip
                    self._gauges[sample.name] = gauge
                gauge.set(sample.value, tags={"replica": self._replica, **sample.labels})


# ---------------------------------------------------------------------------------------------
# Ingress: read the body, hash the prompt, forward to a replica, relay its messages
# ---------------------------------------------------------------------------------------------


class KestrelIngress:
    """The deployment Ray Serve's HTTP proxy sends every request to (an ASGI app, see
    `__serve_build_asgi_app__`). No model, no CPUs reserved."""

    def __init__(self, replicas: DeploymentHandle, max_request_bytes: int) -> None:
        self._forwarder = _Forwarder(replicas, max_request_bytes)

    def __serve_build_asgi_app__(self) -> Any:
        return self._forwarder


class _Forwarder:
    """The ingress's ASGI app."""

    def __init__(self, replicas: DeploymentHandle, max_request_bytes: int) -> None:
        self._replicas = replicas.options(method_name="handle", stream=True)
        self._max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _trivial_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # no websockets
        body = bytearray()
        while len(body) <= self._max_request_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        text = prompt_text(bytes(body)) if scope["method"] == "POST" else None
        call = HTTPCall(
            scope={k: scope[k] for k in _SCOPE_KEYS if k in scope},
            body=bytes(body[: self._max_request_bytes + 1]),
            prefix_hashes=prefix_hashes(text) if text else (),
        )
        request_id = _header(scope, b"x-request-id")
        # A replica that dies before it has answered is tried once more on another (the call
        # has had no effect a client could see); one that dies mid-response ends it with an error.
        for attempt in range(2):
            started, is_sse = False, False
            try:
                async for messages in self._replicas.remote(call):
                    for message in messages:
                        if message["type"] == "http.response.start":
                            started = True
                            is_sse = _is_event_stream(message)
                            message = _drop_echoed_request_id(message, request_id)
                        await send(message)
                return
            except RayActorError as exc:
                logger.warning("replica failed during %s %s: %s", scope["method"], scope["path"], exc)
                if started:
                    await _end_interrupted(send, is_sse)
                    return
                if attempt == 1:
                    error = APIError(503, "no replica could serve the request; retry later",
                                     type=SERVER_ERROR, code="replica_unavailable")  # fmt: skip
                    await _send_error(send, error)
            except Exception as exc:  # Ray's own failures (back pressure, timeouts): one envelope
                logger.exception("forwarding %s %s failed", scope["method"], scope["path"])
                if started:
                    await _end_interrupted(send, is_sse, from_exception(exc))
                else:
                    await _send_error(send, from_exception(exc))
                return


async def _trivial_lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value
    return None


def _is_event_stream(start: Message) -> bool:
    return any(
        k.lower() == b"content-type" and v.startswith(b"text/event-stream")
        for k, v in start.get("headers", ())
    )


def _drop_echoed_request_id(start: Message, request_id: bytes | None) -> Message:
    """Ray's proxy gives every request an X-Request-Id (the client's, else a new one) and adds it
    to the response; the app echoes the same id, which would make two headers."""
    headers = [
        (k, v) for k, v in start.get("headers", ()) if not (k.lower() == b"x-request-id" and v == request_id)
    ]
    return {**start, "headers": headers}


_REPLICA_DIED = APIError(503, "the replica serving this stream stopped; retry the request",
                         type=SERVER_ERROR, code="replica_died")  # fmt: skip


async def _end_interrupted(send: Send, is_sse: bool, error: APIError = _REPLICA_DIED) -> None:
    """End a response cut short (its replica died): an SSE stream gets an in-band error event and
    [DONE], as the single server ends a stream that fails (serving._with_error_and_done)."""
    tail = b""
    if is_sse:
        tail = b"data: " + json.dumps(error.body()).encode() + b"\n\ndata: [DONE]\n\n"
    await send({"type": "http.response.body", "body": tail, "more_body": False})


async def _send_error(send: Send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    await send({
        "type": "http.response.start",
        "status": error.status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body, "more_body": False})


# ---------------------------------------------------------------------------------------------
# Router: prefix affinity on top of power of two choices
# ---------------------------------------------------------------------------------------------


class PrefixAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Routes a call to the replica that last served the longest prefix of its prompt (whole
    64-character chunks: the same system prompt, the earlier turns of a chat), unless that
    replica has more than `max_imbalance` ongoing requests beyond the least loaded candidate or
    refuses (at max_ongoing_requests); then, and for prompts without a known prefix, Ray's power
    of two choices decides. Each routed call records its prefix under the replica chosen.

    The table and the ongoing-request counts are this router's own: one per ingress replica.
    """

    def initialize_state(self, max_imbalance: int = 4, max_entries: int = 1 << 18) -> None:
        self._max_imbalance = max_imbalance
        self._table = AffinityTable(max_entries)
        self._ongoing: dict[ReplicaID, int] = {}
        self._routed_to: dict[str, ReplicaID] = {}  # internal request id -> replica
        self.num_affinity_routed = 0
        self.num_load_routed = 0

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        from ray.serve._private.request_router.pow_2_router import (
            PowerOfTwoChoicesRequestRouter,
        )

        by_load = await PowerOfTwoChoicesRequestRouter.choose_replicas(
            self, candidate_replicas, pending_request
        )
        hashes = _call_hashes(pending_request)
        if not hashes or not candidate_replicas:
            return by_load
        candidates = {r.replica_id: r for r in candidate_replicas}
        hit = self._table.lookup(hashes, candidates)
        if hit is None:
            return by_load
        replica_id = hit[0]
        least = min(self._ongoing.get(r, 0) for r in candidates)
        if self._ongoing.get(replica_id, 0) - least > self._max_imbalance:
            return by_load
        return [[candidates[replica_id]], *by_load]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        hashes = _call_hashes(pending_request)
        if hashes:
            self._table.record(hashes, replica_id)
        self._ongoing[replica_id] = self._ongoing.get(replica_id, 0) + 1
        self._routed_to[pending_request.metadata.internal_request_id] = replica_id

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self._routed_to.pop(internal_request_id, None) is not None:
            self._ongoing[replica_id] = max(0, self._ongoing.get(replica_id, 0) - 1)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._table.forget(replica_id)
        self._ongoing.pop(replica_id, None)


def _call_hashes(pending_request: PendingRequest | None) -> tuple[int, ...]:
    if pending_request is None or not pending_request.args:
        return ()
    # NOTE: by attribute, not isinstance: Ray may load the router's module apart from the one
    # that made the call (the class objects then differ).
    hashes = getattr(pending_request.args[0], "prefix_hashes", ())
    return hashes if isinstance(hashes, tuple) else ()


# ---------------------------------------------------------------------------------------------
# The application and `python -m server --replicas N`
# ---------------------------------------------------------------------------------------------


def build_app(values: Mapping[str, Any]) -> serve.Application:
    """The Serve application for the effective settings (see settings.resolve_values)."""
    ray_config = build_ray_config(values)
    _, server_config = build_configs(values)
    replica_values = dict(values)
    if replica_values["num_threads"] is None:  # one torch thread per reserved CPU
        replica_values["num_threads"] = max(1, round(ray_config.replica_cpus))
    if ray_config.routing == "prefix":
        router = RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={"max_imbalance": ray_config.affinity_max_imbalance},
        )
    else:
        router = RequestRouterConfig(request_router_class=_POW2_ROUTER)
    options: dict[str, Any] = dict(
        name=REPLICA_DEPLOYMENT,
        ray_actor_options={"num_cpus": ray_config.replica_cpus},
        max_ongoing_requests=ray_config.max_ongoing_requests,
        graceful_shutdown_timeout_s=server_config.drain_timeout,
        request_router_config=router,
    )
    if ray_config.is_autoscaling:
        low = ray_config.min_replicas if ray_config.min_replicas is not None else 1
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": ray_config.max_replicas or max(low, ray_config.replicas),
            "initial_replicas": ray_config.replicas,
            "target_ongoing_requests": ray_config.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = ray_config.replicas
    replicas = serve.deployment(KestrelReplica).options(**options).bind(replica_values)
    ingress = serve.deployment(serve.ingress()(KestrelIngress)).options(
        name=INGRESS_DEPLOYMENT,
        ray_actor_options={"num_cpus": 0},
        # Every request passes through; the replicas' own limits decide how many run.
        max_ongoing_requests=max(1000, 4 * ray_config.max_ongoing_requests * max(1, ray_config.replicas)),
    )
    return ingress.bind(replicas, server_config.max_request_bytes)


def run(values: Mapping[str, Any]) -> int:
    """Start (or join) a Ray cluster, deploy, serve until SIGTERM / SIGINT, then tear down."""
    ray_config = build_ray_config(values)
    engine_config, server_config = build_configs(values)
    _prepare_environment(ray_config)
    if ray_config.address is None:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=ray_config.address, logging_level=logging.WARNING)
    _warn_if_short_of_cpus(ray_config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": server_config.host, "port": server_config.port})
        serve.run(build_app(values), name=APP_NAME, route_prefix="/", blocking=False)
        print(
            f"kestrel: serving {engine_config.model} on {ray_config.replicas} replica(s) at "
            f"http://{server_config.host}:{server_config.port} "
            f"(Ray cluster {ray.get_runtime_context().gcs_address})",
            file=sys.stderr,
            flush=True,
        )
        metrics = ", ".join(
            f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            for node in ray.nodes()
            if node["Alive"]
        )
        print(f"kestrel: each replica's metrics, as ray_kestrel_*{{replica=...}}: {metrics}",
              file=sys.stderr, flush=True)  # fmt: skip
        stop.wait()
    finally:
        if ray_config.address is None:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)  # the cluster and its Serve proxies stay up
    return 0


def _prepare_environment(ray_config: RayConfig) -> None:
    """Before ray.init: what the processes of a local cluster inherit."""
    # NOTE: Serve's proxy must pass a readiness check within 5 s by default; on a busy host it
    # needs far longer and is restarted in a loop. Applies to a cluster this process starts; a
    # `ray start` cluster takes it from the environment of `ray start --head`.
    os.environ.setdefault(
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", str(ray_config.proxy_ready_timeout)
    )
    # Replicas import this checkout's engine and server, as this process does.
    path = os.environ.get("PYTHONPATH", "")
    if str(REPO_ROOT) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), path) if p)


def _warn_if_short_of_cpus(ray_config: RayConfig) -> None:
    needed = ray_config.replicas * ray_config.replica_cpus
    available = ray.cluster_resources().get("CPU", 0)
    if needed > available:
        logger.warning(
            "%d replicas x %g CPUs need %g CPUs but the cluster has %g: some replicas will wait "
            "for resources (lower replica_cpus, or add nodes)",
            ray_config.replicas, ray_config.replica_cpus, needed, available,
        )  # fmt: skip


def _configure_logging(config: ServerConfig) -> None:
    """In a replica, the same one-line records as `python -m server` (to the actor's stderr)."""
    kestrel = logging.getLogger("kestrel")
    if kestrel.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(EscapeFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    kestrel.addHandler(handler)
    kestrel.setLevel(config.log_level.upper())
    kestrel.propagate = False
