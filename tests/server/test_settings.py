"""server.settings: flag > env > file > default, sizes, and config/default.toml = the code's defaults."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest

from engine import CacheConfig, EngineConfig, SchedulerConfig
from server.settings import (
    KNOBS,
    ServerConfig,
    SettingsError,
    build_arg_parser,
    format_config,
    load_config,
    parse_memory,
    parse_size,
    resolve_values,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"


def test_defaults_match_engine_and_server_dataclasses() -> None:
    engine, server = load_config()
    assert engine == EngineConfig()
    assert engine.cache == CacheConfig() and engine.scheduler == SchedulerConfig()
    assert server == ServerConfig()


def test_default_toml_lists_every_knob_once_at_its_default() -> None:
    text = (CONFIG_DIR / "default.toml").read_text()
    data = tomllib.loads(text)
    for knob in KNOBS:
        lines = [ln for ln in text.splitlines() if re.match(rf"^#?\s*{knob.name}\s*=", ln)]
        assert len(lines) == 1, (knob.name, lines)
        assert "#" in lines[0].lstrip("#").split("=", 1)[1] or lines[0].startswith("#"), (
            f"{knob.name}: no comment"
        )
        table = data.get(knob.section, {})
        if lines[0].startswith("#"):
            assert knob.default is None and knob.name not in table, knob.name
        else:
            assert knob.parse(table[knob.name]) == knob.default, knob.name
    assert load_config(CONFIG_DIR / "default.toml") == load_config()


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    path = tmp_path / "k.toml"
    path.write_text('[server]\nport = 1111\nhost = "0.0.0.0"\n[scheduler]\nmax_waiting = 3\n')
    env = {"KESTREL_PORT": "2222", "KESTREL_MAX_WAITING": "4", "OTHER": "x"}
    engine, server = load_config(path, env, ["--port", "3333"])
    assert server.port == 3333 and server.host == "0.0.0.0"
    assert engine.scheduler.max_waiting == 4
    _, server = load_config(path, env)
    assert server.port == 2222
    _, server = load_config(path)
    assert server.port == 1111
    # the file itself can be chosen by env or flag
    _, server = load_config(None, {"KESTREL_CONFIG": str(path)})
    assert server.port == 1111
    _, server = load_config(None, {}, ["--config", str(path)])
    assert server.port == 1111


def test_values_and_types() -> None:
    engine, server = load_config(None, {
        "KESTREL_KV_CACHE_MEMORY": "2GiB", "KESTREL_CORS_ORIGINS": "http://a, http://b",
        "KESTREL_ACCESS_LOG": "false", "KESTREL_API_KEY": "k", "KESTREL_DEFAULT_TEMPERATURE": "0.5",
    }, ["--max-model-len", "4096", "--model-aliases", "x,y", "--served-model-name", "m", "--no-access-log",
        "--default-max-tokens", "100"])  # fmt: skip
    assert engine.cache.memory_bytes == 2 * 2**30
    assert engine.max_model_len == 4096
    assert server.cors_origins == ("http://a", "http://b")
    assert server.model_aliases == ("x", "y") and server.served_model_name == "m"
    assert server.access_log is False and server.api_key == "k"
    assert dict(server.sampling_defaults) == {"temperature": 0.5, "max_tokens": 100}
    engine, _ = load_config(None, {"KESTREL_KV_CACHE_MEMORY": "0.1"})
    assert engine.cache.memory_bytes is None and engine.cache.memory_fraction == 0.1


def test_sizes() -> None:
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size(4096) == 4096
    assert parse_memory(0.5) == 0.5 and parse_memory("25%") == 0.25 and parse_memory(1) == 1.0
    assert parse_memory("1GiB") == 2**30 and parse_memory(2**30) == 2**30
    for bad in ("lots", "-1", "0", "2 parsecs"):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ValueError):
        parse_memory(1.5)


@pytest.mark.parametrize(
    ("env", "argv", "message"),
    [
        ({"KESTREL_PORT": "eighty"}, [], "KESTREL_PORT"),
        ({}, ["--port", "70000"], "port"),
        ({}, ["--log-level", "loud"], "--log-level"),
        ({}, ["--dtype", "int3"], "--dtype"),
        ({"KESTREL_MAX_NUM_SEQS": "0"}, [], "KESTREL_MAX_NUM_SEQS"),
        ({"KESTREL_CONFIG": "/nonexistent.toml"}, [], "not found"),
    ],
)
def test_bad_values_name_their_source(env, argv, message) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_config(None, env, argv)


def test_unknown_file_keys_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text("[server]\nprot = 1\n")
    with pytest.raises(SettingsError, match="unknown setting"):
        load_config(path)
    path.write_text("[model]\nport = 1\n")  # right key, wrong section
    with pytest.raises(SettingsError, match="unknown setting"):
        load_config(path)


def test_qwen_example_override() -> None:
    engine, server = load_config(CONFIG_DIR / "qwen-coder.toml")
    assert engine.model == "qwen2.5-coder-0.5b-instruct"
    assert server.served_model_name == "qwen2.5-coder" and engine.max_model_len == 8192
    assert engine.scheduler == SchedulerConfig()  # everything else stays at the defaults


def test_format_config_masks_api_key_and_is_toml() -> None:
    values = resolve_values(None, {"KESTREL_API_KEY": "secret"}, [])
    text = format_config(values)
    assert "secret" not in text and 'api_key = "***"' in text
    assert tomllib.loads(text)["server"]["port"] == 8000


def test_every_knob_has_a_flag_and_help() -> None:
    help_text = build_arg_parser().format_help()
    for knob in KNOBS:
        assert knob.flag in help_text


def _modules_imported(*args: str) -> tuple[int, set[str]]:
    """Exit code and the top-level modules a fresh interpreter imported running `args`."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=120
    )
    # -X importtime writes "import time: self | cumulative | module" lines to stderr.
    names = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return proc.returncode, names


@pytest.mark.parametrize(
    "args, code",
    [
        (["-c", "import sys, server.settings; assert 'torch' not in sys.modules"], 0),
        (["-m", "server", "--help"], 0),
        (["-m", "server", "--port", "eighty"], 2),  # a settings error
    ],
)
def test_help_and_settings_errors_do_not_load_torch(args, code) -> None:
    returncode, modules = _modules_imported(*args)
    assert returncode == code
    assert "server" in modules and "engine" in modules
    assert "torch" not in modules


@pytest.mark.parametrize(
    ("policy", "environ", "expected"),
    [
        ("brief", {}, {"GOMP_SPINCOUNT": "10000"}),
        ("passive", {}, {"OMP_WAIT_POLICY": "PASSIVE"}),
        ("active", {}, {"OMP_WAIT_POLICY": "ACTIVE"}),
        ("brief", {"OMP_WAIT_POLICY": "passive"}, {"OMP_WAIT_POLICY": "passive"}),  # the environment wins
        ("brief", {"GOMP_SPINCOUNT": "50"}, {"GOMP_SPINCOUNT": "50"}),
        ("passive", {"OMP_WAIT_POLICY": "active"}, {"OMP_WAIT_POLICY": "active"}),
    ],
)
def test_thread_wait_policy_sets_what_libgomp_reads(monkeypatch, policy, environ, expected):
    from server.__main__ import set_thread_wait_policy

    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    set_thread_wait_policy(policy)
    assert {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ} == expected
