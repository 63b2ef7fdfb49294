"""Start and stop the servers a benchmark drives: Kestrel itself and peers (transformers serve, llama.cpp)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
STOP_TIMEOUT = 60.0  # Kestrel exits within drain_timeout (8 s by default) + 1 s


class ServerStartError(Exception):
    """A server exited or stayed unhealthy while starting; the message ends with its log's tail."""


@dataclass
class ManagedServer:
    """A server process this benchmark started, in its own process group, logging to `log_path`."""

    name: str
    command: list[str]
    base_url: str
    log_path: Path
    proc: subprocess.Popen

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def log_tail(self, num_chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-num_chars:]
        except OSError:
            return ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def kestrel_command(
    model: str, port: int, *, dtype: str, device: str, extra: Sequence[str] = ()
) -> list[str]:
    """`python -m server` on a loopback port; `model` is a catalogue name or a model directory."""
    flags = {
        "--model": model,
        "--host": HOST,
        "--port": str(port),
        "--dtype": dtype,
        "--device": device,
    }
    return [sys.executable, "-m", "server", *_flat(flags), *extra]


def transformers_command(
    model_dir: Path, port: int, *, dtype: str, device: str, extra: Sequence[str] = ()
) -> list[str]:
    """`transformers serve --continuous-batching`, pinned to `model_dir`.

    NOTE: a pinned server only accepts requests whose `model` is the exact string it was given,
    so requests must send `peer_model_name(model_dir)`. Loading on a device needs `accelerate`.
    """
    cli = [sys.executable, "-m", "transformers.cli.transformers", "serve"]
    flags = {"--dtype": dtype, "--device": device, "--host": HOST, "--port": str(port)}
    return [*cli, str(model_dir), "--continuous-batching", *_flat(flags), *extra]


def _flat(flags: dict[str, str]) -> list[str]:
    return [item for pair in flags.items() for item in pair]


def peer_model_name(model_dir: Path) -> str:
    return str(model_dir)


# ---------------------------------------------------------------------------------------------
# Peers: how each is set up for one benchmark run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerSetup:
    """What a peer is told about the run: the model Kestrel serves and the workload's extent."""

    model: str  # Kestrel's --model: catalogue name, model directory or .gguf file
    dtype: str
    device: str
    max_concurrency: int  # most requests in flight at any level
    max_tokens: int
    conversations: list[list[dict[str, str]]]  # every prompt the run may send
    extra: Sequence[str] = ()


@dataclass(frozen=True)
class PeerLaunch:
    """A peer ready to start: `command(port)`, the request's `model`, and the settings to report."""

    command: Callable[[int], list[str]]
    model: str
    settings: tuple[str, ...]


def setup_transformers(setup: PeerSetup) -> PeerLaunch:
    """`transformers serve --continuous-batching` on the Hugging Face directory Kestrel loads."""
    model_dir = _resolve_model(setup.model)
    if model_dir.suffix == ".gguf":
        raise PeerError(
            f"the transformers peer needs a Hugging Face directory, not {model_dir}; "
            "give --model a catalogue name without the quantization suffix"
        )

    def command(port: int) -> list[str]:
        return transformers_command(
            model_dir, port, dtype=setup.dtype, device=setup.device, extra=setup.extra
        )

    settings = (f"transformers serve --continuous-batching on {model_dir}, {setup.dtype}",)
    return PeerLaunch(command, peer_model_name(model_dir), settings)


class PeerError(Exception):
    """A peer cannot run on this model or machine; the message says what to do."""


def _engine_assets() -> Any:
    try:
        import engine.assets as assets
    except ImportError:  # running from a checkout without `pip install -e .`
        sys.path.insert(0, str(REPO_ROOT))
        import engine.assets as assets
    return assets


def _resolve_model(name_or_path: str) -> Path:
    """A Hugging Face directory or GGUF file for a catalogue name (fetched on first use) or path."""
    assets = _engine_assets()
    try:
        return assets.resolve_model(name_or_path).resolve()
    except assets.AssetError as exc:
        raise PeerError(str(exc)) from None


# llama.cpp's llama-server, built by benchmarks/build_llama_server.sh.
LLAMA_CPP_CTX_MARGIN = 64  # tokens per slot beyond the longest prompt and max_tokens
LLAMA_CPP_CTX_PAD = 256  # llama.cpp rounds each slot's context up to a multiple of this
_CPU_FLAGS = re.compile(r"^(avx|avx2|fma|f16c|avx512\w*|amx\w*|avx_vnni)$")


def model_gguf(name_or_path: str) -> Path:
    """The GGUF file behind what Kestrel serves: the file itself, a catalogue GGUF
    (`<name>-<quantization>`), or for a catalogue model converted to a directory (`<name>`, or
    the directory) the GGUF it was converted from."""
    assets = _engine_assets()
    path = Path(name_or_path).expanduser()
    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise PeerError(f"llama.cpp needs a GGUF file, not {path}")
            return path.resolve()
        if path.is_dir():
            marker = path / assets.MARKER_FILE
            name = json.loads(marker.read_text()).get("name") if marker.is_file() else None
            if name not in assets.CATALOGUE:
                raise PeerError(
                    f"{path} is not a catalogue model converted from a GGUF; "
                    "give --model the .gguf file llama.cpp should serve"
                )
            return assets.fetch_gguf(name).resolve()
        return assets.fetch_gguf(assets.get_entry(name_or_path).name).resolve()
    except assets.AssetError as exc:
        raise PeerError(str(exc)) from None


def max_prompt_tokens(gguf_path: Path, conversations: list[list[dict[str, str]]]) -> int:
    """The longest chat prompt in tokens, rendered with the GGUF's own template and tokenizer
    (Kestrel's, which splits text as llama.cpp does). A catalogue GGUF's converted directory
    holds the same tokenizer and template, and loads in a second where reading the GGUF's
    vocabulary takes tens of seconds."""
    assets = _engine_assets()
    from engine.gguf_tokenizer import tokenizer_from_gguf
    from engine.tokenizer import Tokenizer

    entry = assets.entry_of_gguf(gguf_path)
    model_dir = assets.model_path(entry.name) if entry is not None else None
    if model_dir is not None and assets.is_complete(model_dir):
        tokenizer = Tokenizer.from_pretrained(model_dir)
    else:
        tokenizer = tokenizer_from_gguf(gguf_path)
    return max(len(tokenizer.encode_chat(messages)) for messages in conversations)


def cpu_signature() -> tuple[str, frozenset[str]]:
    """The CPU a native build is for: its model name and the ISA flags ggml's kernels use
    (the same as build_llama_server.sh records)."""
    model, flags = "", frozenset[str]()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = frozenset(v for v in value.split() if _CPU_FLAGS.match(v))
    return model, flags


def llama_cpp_home() -> Path:
    return _engine_assets().kestrel_home() / "peers" / "llama.cpp"


def read_build_info(binary: Path) -> dict[str, str]:
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in (binary.parent / "BUILD_INFO").read_text().splitlines():
            key, _, value = line.partition(": ")
            info[key] = value
    return info


def find_llama_server() -> tuple[Path, dict[str, str]]:
    """$KESTREL_LLAMA_SERVER, else the newest build under $KESTREL_HOME/peers/llama.cpp that was
    built for this CPU; with its BUILD_INFO."""
    if os.environ.get("KESTREL_LLAMA_SERVER"):
        binary = Path(os.environ["KESTREL_LLAMA_SERVER"]).expanduser()
        if not os.access(binary, os.X_OK):
            raise PeerError(f"KESTREL_LLAMA_SERVER={binary} is not an executable")
        return binary, read_build_info(binary)

    def version_key(path: Path) -> tuple[int, ...]:
        return tuple(int(p) if p.isdigit() else -1 for p in path.parent.name.split("."))

    home = llama_cpp_home()
    binaries = sorted(home.glob("*/llama-server"), key=version_key, reverse=True)
    build = "build it with benchmarks/build_llama_server.sh (about 20 minutes on 2 cores)"
    if not binaries:
        raise PeerError(f"no llama-server under {home}: {build}")
    model, flags = cpu_signature()
    for binary in binaries:
        info = read_build_info(binary)
        built_model, _, built_flags = info.get("cpu", "").partition(" | ")
        if built_model.strip() == model and frozenset(built_flags.split()) == flags:
            return binary, info
    raise PeerError(
        f"{', '.join(map(str, binaries))} built for another CPU (native build); {build}"
    )


def setup_llama_cpp(setup: PeerSetup) -> PeerLaunch:
    """llama-server on the GGUF that Kestrel serves: one slot per request in flight, each slot
    large enough for the longest prompt plus max_tokens, all cores, continuous batching, the
    GGUF's chat template (--jinja); prompt caching as llama.cpp ships it."""
    if setup.device != "cpu":
        raise PeerError(f"the llama.cpp peer is a CPU build; --device {setup.device} is not it")
    binary, info = find_llama_server()
    gguf_path = model_gguf(setup.model)
    num_slots = setup.max_concurrency
    longest = max_prompt_tokens(gguf_path, setup.conversations)
    needed = longest + setup.max_tokens + LLAMA_CPP_CTX_MARGIN
    slot_ctx = -(-needed // LLAMA_CPP_CTX_PAD) * LLAMA_CPP_CTX_PAD
    threads = os.cpu_count() or 1
    alias = setup.model if not Path(setup.model).expanduser().exists() else gguf_path.stem
    flags = {
        "--model": str(gguf_path),
        "--alias": alias,
        "--host": HOST,
        "--parallel": str(num_slots),
        "--ctx-size": str(num_slots * slot_ctx),
        "--threads": str(threads),
    }

    def command(port: int) -> list[str]:
        return [
            str(binary),
            *_flat(flags),
            "--port",
            str(port),
            "--cont-batching",
            "--jinja",
            *setup.extra,
        ]

    version = (
        f"llama-cpp-python {info.get('llama-cpp-python', '?')}, "
        f"llama.cpp {info.get('llama.cpp commit', '?')}"
    )
    is_same_file = setup.model.endswith(".gguf") or setup.model in _engine_assets().GGUF_CATALOGUE
    weights = (
        "the file Kestrel serves"
        if is_same_file
        else "the GGUF that Kestrel's directory was converted from: Kestrel runs it dequantized"
    )
    settings = (
        f"llama-server {binary} ({version}; native CPU build)",
        f"model {gguf_path} ({weights}), requests name it {alias!r}",
        f"--parallel {num_slots} slots (the highest concurrency), --ctx-size {num_slots * slot_ctx}"
        f" = {num_slots} x {slot_ctx} (longest prompt {longest} + max_tokens {setup.max_tokens}"
        f" + {LLAMA_CPP_CTX_MARGIN} = {needed}, rounded up to {LLAMA_CPP_CTX_PAD} as llama.cpp"
        f" does), --threads {threads} (batch threads the same)",
        "--cont-batching, --jinja (the GGUF's chat template); llama.cpp defaults otherwise: "
        "prompt cache on (per slot, plus --cache-ram 8192 MiB), f16 KV cache, no speculative "
        "decoding, batch 2048 / ubatch 512",
    )
    return PeerLaunch(command, alias, settings)


PEERS: dict[str, Callable[[PeerSetup], PeerLaunch]] = {
    "transformers": setup_transformers,
    "llama.cpp": setup_llama_cpp,
}


@contextlib.contextmanager
def launched(
    name: str, command: list[str], port: int, log_dir: Path, startup_timeout: float
) -> Iterator[ManagedServer]:
    """Start `command`, wait for GET /health == 200, yield; always stop it on the way out."""
    log_path = log_dir / f"{name}-{port}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C reaches only us; we stop the server in order
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (no locks taken)
        )
    server = ManagedServer(name, command, f"http://{HOST}:{port}", log_path, proc)
    try:
        wait_healthy(server, startup_timeout)
        yield server
    finally:
        stop(server)


def wait_healthy(server: ManagedServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        while time.monotonic() < deadline:
            code = server.exit_code()
            if code is not None:
                raise ServerStartError(
                    f"{server.name} exited with code {code}:\n{server.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{server.base_url}/health").status_code == 200:
                    return
            time.sleep(0.25)
    raise ServerStartError(f"{server.name} not healthy after {timeout:.0f} s:\n{server.log_tail()}")


def stop(server: ManagedServer, timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM the server's process group and wait; SIGKILL it if it does not exit in time."""
    if server.proc.poll() is None:
        _signal_group(server.proc, signal.SIGTERM)
        try:
            return server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(server.proc, signal.SIGKILL)
    return server.proc.wait()


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)  # the group this benchmark created for the server


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()  # looked up here: the child should only call it
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM it if the benchmark itself dies (even by SIGKILL)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
