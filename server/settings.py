"""config/default.toml + KESTREL_* environment + CLI flags -> frozen EngineConfig and ServerConfig."""

from __future__ import annotations

import argparse
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from engine import CacheConfig, EngineConfig, SchedulerConfig

ENV_PREFIX = "KESTREL_"
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "default.toml"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
DTYPES = ("bfloat16", "float32", "float16")


class SettingsError(ValueError):
    """A configuration value that cannot be used; the message names where it came from."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: no authentication
    served_model_name: str | None = None  # None: the engine's model name
    model_aliases: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    max_request_bytes: int = 8 * 1024 * 1024
    # Bounds on the work one request may ask for (server/limits.py); beyond them a 400.
    max_prompts: int = 256
    max_messages: int = 2048
    max_content_parts: int = 2048
    max_logit_bias: int = 300
    max_token_ids: int = 131072
    log_level: str = "info"
    access_log: bool = True
    drain_timeout: float = 8.0  # seconds in-flight requests may finish after SIGTERM (see default.toml)
    sse_ping_interval: float = 15.0  # seconds between SSE comment pings
    retry_after: int = 1  # seconds, sent with 429
    # How the process's idle kernel threads wait, set before torch loads (see default.toml)
    thread_wait_policy: str = "brief"
    grammar_compile_timeout: float = 10.0  # seconds a structured output's grammar may take to compile
    tool_call_parser: str = "auto"  # the model's tool-call syntax (server/tool_calls.py PARSERS)
    # Sampling defaults between the request's values and the model's generation_config.json.
    sampling_defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


ROUTING_POLICIES = ("prefix", "pow2")


@dataclass(frozen=True)
class RayConfig:
    """Kestrel on Ray Serve (server/ray_serve.py); `replicas == 0` serves without Ray."""

    replicas: int = 0  # engine replicas at start (each a Ray actor with its own engine)
    address: str | None = None  # an existing cluster ("auto", "host:6379"); None: start a local one
    min_replicas: int | None = None  # autoscaling bounds; both None: a fixed number of replicas
    max_replicas: int | None = None
    target_ongoing_requests: float = 16.0  # per replica, what autoscaling steers towards
    max_ongoing_requests: int = 64  # per replica; more wait in the router for a free replica
    replica_cpus: float = 1.0  # CPUs Ray reserves for each replica
    routing: str = "prefix"  # prefix (affinity, then power of two choices) | pow2
    affinity_max_imbalance: int = 4  # ongoing requests the affine replica may hold beyond the least loaded
    proxy_ready_timeout: float = 120.0  # seconds Serve's HTTP proxy may take to start (busy hosts)

    @property
    def is_enabled(self) -> bool:
        return self.replicas > 0

    @property
    def is_autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None


# ---------------------------------------------------------------------------------------------
# Value parsers: each takes a TOML value or a string (env / flag) and returns the typed value.
# ---------------------------------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as "512MiB", "2GiB", "1.5GB"."""
    if isinstance(value, bool):
        raise TypeError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
            if size > 0:
                return size
    raise ValueError(f"expected a size such as 512MiB or 2GiB, got {value!r}")


def parse_memory(value: Any) -> int | float:
    """KV cache memory: a fraction in (0, 1] of available memory, or a size in bytes."""
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            value = float(text[:-1]) / 100
        else:
            try:
                value = float(text)
            except ValueError:
                return parse_size(text)
            if value > 1:
                value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value == 1:
        value = 1.0  # "all of it", not one byte
    if isinstance(value, float):
        if not (math.isfinite(value) and 0 < value <= 1):
            raise ValueError(f"a fraction of memory must be in (0, 1], got {value}")
        return value
    return parse_size(value)


def _parse_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _parse_int(value: Any) -> int:
    if isinstance(value, str):
        value = value.strip()
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _parse_float(value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return float(value)


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
    raise ValueError(f"expected true or false, got {value!r}")


def _parse_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"expected a list of strings, got {value!r}")


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """An empty string (TOML or env) means unset."""

    def parse_optional(value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return parse(value)

    return parse_optional


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse_choice(value: Any) -> str:
        text = _parse_str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return text

    return parse_choice


def _at_least(parse: Callable[[Any], Any], low: float) -> Callable[[Any], Any]:
    def parse_bounded(value: Any) -> Any:
        parsed = parse(value)
        if parsed is not None and parsed < low:
            raise ValueError(f"must be >= {low}, got {parsed}")
        return parsed

    return parse_bounded


@dataclass(frozen=True)
class Knob:
    """One setting: `[section] name` in TOML, KESTREL_NAME in the environment, --name as a flag."""

    section: str
    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


_opt_int = _optional(_at_least(_parse_int, 1))
_opt_float = _optional(_parse_float)

KNOBS: tuple[Knob, ...] = (
    Knob("model", "model", _parse_str, "smollm2-135m-instruct", "catalogue name, Hugging Face model directory or .gguf file"),
    Knob("model", "served_model_name", _optional(_parse_str), None, "the name clients send as `model`; unset: the model's name"),
    Knob("model", "model_aliases", _parse_list, (), "further names accepted as `model`"),
    Knob("model", "dtype", _choice(*DTYPES), "bfloat16", "weights and activations dtype"),
    Knob("model", "quantization", _choice("none", "int8", "q4"), "none", "linears quantized at load: int8 (Q8_0 blocks) or q4 (Q4_1); a GGUF file keeps its own"),
    Knob("model", "device", _parse_str, "cpu", "torch device"),
    Knob("model", "max_model_len", _opt_int, None, "context length in tokens; unset: the model's max_position_embeddings"),
    Knob("model", "chat_template", _optional(_parse_str), None, "path to a chat template overriding the model's"),
    Knob("model", "num_threads", _opt_int, None, "torch intra-op threads; unset: torch's default"),
    Knob("model", "thread_wait_policy", _choice("brief", "passive", "active"), "brief", "idle kernel threads spin briefly then sleep (brief), sleep (passive) or spin (active); OMP_WAIT_POLICY / GOMP_SPINCOUNT in the environment win"),
    Knob("cache", "block_size", _at_least(_parse_int, 1), 16, "tokens per KV cache block"),
    Knob("cache", "kv_cache_memory", parse_memory, 2 * 2**30, "KV pool: a size (\"2GiB\") or a fraction of available memory"),
    Knob("cache", "enable_prefix_caching", _parse_bool, True, "reuse the cached KV blocks a prompt shares with earlier ones"),
    Knob("scheduler", "max_num_seqs", _at_least(_parse_int, 1), 64, "sequences decoding together in one step"),
    Knob("scheduler", "max_num_batched_tokens", _at_least(_parse_int, 1), 2048, "tokens (prefill chunks + decodes) in one step"),
    Knob("scheduler", "max_prefill_attention", _at_least(_parse_int, 1), 262144, "query-key pairs the prompt chunks of one step attend over (a chunk of c tokens after p: c * (p + c)); bounds how long a long prompt stops the decodes"),
    Knob("scheduler", "max_waiting", _at_least(_parse_int, 0), 256, "queued requests beyond which new ones get 429"),
    Knob("scheduler", "speculative_tokens", _at_least(_parse_int, 0), 4, "prompt-lookup draft tokens verified per greedy sequence and step; 0: off"),
    Knob("scheduler", "speculative_max_seqs", _at_least(_parse_int, 0), 1, "speculate only while at most this many sequences run"),
    Knob("server", "host", _parse_str, "127.0.0.1", "address to listen on"),
    Knob("server", "port", _parse_int, 8000, "TCP port to listen on"),
    Knob("server", "api_key", _optional(_parse_str), None, "require `Authorization: Bearer <key>` on every route but /health"),
    Knob("server", "cors_origins", _parse_list, (), "origins allowed by CORS (\"*\" for any); empty: CORS off"),
    Knob("server", "max_request_bytes", parse_size, 8 * 1024 * 1024, "largest accepted request body (413 beyond)"),
    Knob("server", "max_prompts", _at_least(_parse_int, 1), 256, "prompts in one /v1/completions request (400 beyond; also beyond max_waiting, which could never admit them)"),
    Knob("server", "max_messages", _at_least(_parse_int, 1), 2048, "messages in one chat or /tokenize request (400 beyond)"),
    Knob("server", "max_content_parts", _at_least(_parse_int, 1), 2048, "content parts over all of a request's messages (400 beyond)"),
    Knob("server", "max_logit_bias", _at_least(_parse_int, 0), 300, "logit_bias entries (OpenAI's limit; 400 beyond)"),
    Knob("server", "max_token_ids", _at_least(_parse_int, 1), 131072, "token ids in /detokenize or over a completions request's prompts (400 beyond)"),
    Knob("server", "log_level", _choice(*LOG_LEVELS), "info", "logging level"),
    Knob("server", "access_log", _parse_bool, True, "log one line per request"),
    Knob("server", "drain_timeout", _at_least(_parse_float, 0), 8.0, "seconds in-flight requests may finish after SIGTERM; then they end with a 503 and the process exits within 1 s"),
    Knob("server", "sse_ping_interval", _at_least(_parse_float, 0), 15.0, "seconds between keep-alive comments on idle streams (0: off)"),
    Knob("server", "retry_after", _at_least(_parse_int, 0), 1, "seconds sent in Retry-After when the queue is full"),
    Knob("server", "grammar_compile_timeout", _at_least(_parse_float, 0), 10.0, "seconds a structured output's schema or grammar may take to compile (400 beyond)"),
    Knob("server", "tool_call_parser", _choice("auto", "hermes", "llama3_json", "mistral"), "auto", "the model's tool-call syntax; auto: the one its chat template prompts for"),
    Knob("ray", "replicas", _at_least(_parse_int, 0), 0, "engine replicas behind Ray Serve's HTTP proxy; 0: one process, no Ray"),
    Knob("ray", "ray_address", _optional(_parse_str), None, "join this Ray cluster (\"auto\": the one `ray start` made here); unset: start a local one"),
    Knob("ray", "min_replicas", _optional(_at_least(_parse_int, 0)), None, "autoscaling: fewest replicas (unset with max_replicas unset: no autoscaling)"),
    Knob("ray", "max_replicas", _opt_int, None, "autoscaling: most replicas"),
    Knob("ray", "target_ongoing_requests", _at_least(_parse_float, 0.1), 16.0, "autoscaling: ongoing requests per replica to steer towards"),
    Knob("ray", "max_ongoing_requests", _at_least(_parse_int, 1), 64, "requests one replica takes at once; more wait in the router"),
    Knob("ray", "replica_cpus", _at_least(_parse_float, 0), 1.0, "CPUs Ray reserves per replica (num_threads defaults to it)"),
    Knob("ray", "routing", _choice(*ROUTING_POLICIES), "prefix", "prefix: to the replica that served the prompt's prefix unless it is busy, else power of two choices; pow2: Ray's default"),
    Knob("ray", "affinity_max_imbalance", _at_least(_parse_int, 0), 4, "ongoing requests the prefix's replica may hold beyond the least loaded before routing by load"),
    Knob("ray", "proxy_ready_timeout", _at_least(_parse_float, 1), 120.0, "seconds Ray Serve's HTTP proxy may take to start (RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S)"),
    Knob("sampling", "default_temperature", _opt_float, None, "used when a request has no temperature (before the model's default)"),
    Knob("sampling", "default_top_p", _opt_float, None, "used when a request has no top_p"),
    Knob("sampling", "default_top_k", _optional(_parse_int), None, "used when a request has no top_k"),
    Knob("sampling", "default_min_p", _opt_float, None, "used when a request has no min_p"),
    Knob("sampling", "default_repetition_penalty", _opt_float, None, "used when a request has no repetition_penalty"),
    Knob("sampling", "default_max_tokens", _opt_int, None, "used when a request has no max_tokens (chat: else the context limit, completions: else 16)"),
)  # fmt: skip

KNOBS_BY_NAME = {k.name: k for k in KNOBS}
SAMPLING_PREFIX = "default_"


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


def read_toml(path: str | Path) -> dict[str, Any]:
    """Knob values from a TOML file; unknown sections or keys are errors (typos must not pass)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: invalid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise SettingsError(f"{path}: top-level key {section!r} must be a [section]")
        for name, value in table.items():
            knob = KNOBS_BY_NAME.get(name)
            if knob is None or knob.section != section:
                raise SettingsError(f"{path}: unknown setting [{section}] {name}")
            values[name] = _parse(knob, value, f"{path} [{section}] {name}")
    return values


def read_env(env: Mapping[str, str]) -> dict[str, Any]:
    return {
        knob.name: _parse(knob, env[knob.env_var], f"environment variable {knob.env_var}")
        for knob in KNOBS
        if knob.env_var in env
    }


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Kestrel: an OpenAI-compatible LLM inference server. Every flag can also be "
        f"set as {ENV_PREFIX}<NAME> in the environment or in a TOML config file "
        "(precedence: flag > environment > file > built-in default).",
    )
    parser.add_argument(
        "--config", metavar="PATH", default=None, help=f"TOML config file (or {ENV_PREFIX}CONFIG)"
    )
    for section in dict.fromkeys(k.section for k in KNOBS):
        group = parser.add_argument_group(f"[{section}]")
        for knob in (k for k in KNOBS if k.section == section):
            default = _show(knob.default)
            text = f"{knob.help} (default: {default})".replace("%", "%%")
            if knob.parse is _parse_bool:
                group.add_argument(knob.flag, dest=knob.name, default=None,
                                   action=argparse.BooleanOptionalAction, help=text)  # fmt: skip
            else:
                group.add_argument(
                    knob.flag, dest=knob.name, default=None, metavar="VALUE", help=text
                )
    return parser


def read_argv(argv: Sequence[str]) -> tuple[str | None, dict[str, Any]]:
    """(--config path or None, knob values given as flags)."""
    args = build_arg_parser().parse_args(list(argv))
    values = {
        knob.name: _parse(knob, getattr(args, knob.name), f"flag {knob.flag}")
        for knob in KNOBS
        if getattr(args, knob.name) is not None
    }
    return args.config, values


def _parse(knob: Knob, value: Any, source: str) -> Any:
    try:
        return knob.parse(value)
    except (ValueError, TypeError) as exc:
        raise SettingsError(f"{source}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------


def resolve_values(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every knob's effective value: flag > environment > config file > built-in default."""
    env = {} if env is None else env
    config_flag, flag_values = read_argv(argv or [])
    config_path = config_flag or env.get(ENV_PREFIX + "CONFIG") or path
    values = {k.name: k.default for k in KNOBS}
    if config_path:
        values.update(read_toml(config_path))
    values.update(read_env(env))
    values.update(flag_values)
    return values


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
) -> tuple[EngineConfig, ServerConfig]:
    """Build the frozen configs once. `path` is a TOML file; KESTREL_CONFIG or --config replace it."""
    return build_configs(resolve_values(path, env, argv))


def build_configs(values: Mapping[str, Any]) -> tuple[EngineConfig, ServerConfig]:
    if not 0 < values["port"] < 65536:
        raise SettingsError(f"port must be in 1..65535, got {values['port']}")
    memory = values["kv_cache_memory"]
    cache = CacheConfig(
        block_size=values["block_size"],
        memory_bytes=memory if isinstance(memory, int) else None,
        memory_fraction=memory if isinstance(memory, float) else CacheConfig.memory_fraction,
        enable_prefix_caching=values["enable_prefix_caching"],
    )
    scheduler = SchedulerConfig(
        max_num_seqs=values["max_num_seqs"],
        max_num_batched_tokens=values["max_num_batched_tokens"],
        max_prefill_attention=values["max_prefill_attention"],
        max_waiting=values["max_waiting"],
        speculative_tokens=values["speculative_tokens"],
        speculative_max_seqs=values["speculative_max_seqs"],
    )
    engine_config = EngineConfig(
        model=values["model"],
        dtype=values["dtype"],
        quantization=values["quantization"],
        device=values["device"],
        max_model_len=values["max_model_len"],
        chat_template=values["chat_template"],
        num_threads=values["num_threads"],
        cache=cache,
        scheduler=scheduler,
    )
    sampling = {
        k.name.removeprefix(SAMPLING_PREFIX): values[k.name]
        for k in KNOBS
        if k.section == "sampling" and values[k.name] is not None
    }
    server_config = ServerConfig(
        host=values["host"],
        port=values["port"],
        api_key=values["api_key"],
        served_model_name=values["served_model_name"],
        model_aliases=tuple(values["model_aliases"]),
        cors_origins=tuple(values["cors_origins"]),
        max_request_bytes=values["max_request_bytes"],
        max_prompts=values["max_prompts"],
        max_messages=values["max_messages"],
        max_content_parts=values["max_content_parts"],
        max_logit_bias=values["max_logit_bias"],
        max_token_ids=values["max_token_ids"],
        log_level=values["log_level"],
        access_log=values["access_log"],
        drain_timeout=values["drain_timeout"],
        sse_ping_interval=values["sse_ping_interval"],
        retry_after=values["retry_after"],
        thread_wait_policy=values["thread_wait_policy"],
        grammar_compile_timeout=values["grammar_compile_timeout"],
        tool_call_parser=values["tool_call_parser"],
        sampling_defaults=MappingProxyType(sampling),
    )
    return engine_config, server_config


def build_ray_config(values: Mapping[str, Any]) -> RayConfig:
    """The [ray] settings; checks the autoscaling bounds against the starting replicas."""
    config = RayConfig(
        replicas=values["replicas"],
        address=values["ray_address"],
        min_replicas=values["min_replicas"],
        max_replicas=values["max_replicas"],
        target_ongoing_requests=values["target_ongoing_requests"],
        max_ongoing_requests=values["max_ongoing_requests"],
        replica_cpus=values["replica_cpus"],
        routing=values["routing"],
        affinity_max_imbalance=values["affinity_max_imbalance"],
        proxy_ready_timeout=values["proxy_ready_timeout"],
    )
    if config.is_autoscaling:
        low = config.min_replicas if config.min_replicas is not None else 1
        high = config.max_replicas if config.max_replicas is not None else max(low, config.replicas)
        if not low <= max(config.replicas, 1) <= high:
            raise SettingsError(
                f"replicas ({config.replicas}) must lie within min_replicas ({low}) and "
                f"max_replicas ({high})"
            )
    return config


def format_config(values: Mapping[str, Any]) -> str:
    """The effective configuration as TOML (the API key masked), for the start-up banner."""
    lines: list[str] = []
    for section in dict.fromkeys(k.section for k in KNOBS):
        lines.append(f"[{section}]")
        for knob in (k for k in KNOBS if k.section == section):
            value = values[knob.name]
            if knob.name == "api_key" and value:
                lines.append(f'{knob.name} = "***"')
            elif value is None:
                lines.append(f"# {knob.name} = (unset)")
            else:
                lines.append(f"{knob.name} = {_show(value)}")
    return "\n".join(lines)


def _show(value: Any) -> str:
    """A value in TOML syntax."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)
