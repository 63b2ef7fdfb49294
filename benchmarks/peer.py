"""Start and stop the servers a benchmark drives: Kestrel itself and peers such as transformers serve."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
STOP_TIMEOUT = 60.0  # Kestrel drains in-flight requests for up to 30 s by default


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


PEERS: dict[str, Callable[..., list[str]]] = {"transformers": transformers_command}


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
