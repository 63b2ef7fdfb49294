"""Shared fixtures: tiny random Hugging Face checkpoints written to tmp_path, the real default model."""

from __future__ import annotations

from pathlib import Path

import pytest

DEFAULT_MODEL = "smollm2-135m-instruct"

# A test that uses any of these (directly or through another fixture) loads a model, builds the
# kernels or starts a server: it is marked slow. Tests that do so without them say so themselves.
SLOW_FIXTURES = {"default_model_dir", "tiny_llama", "tiny_qwen2", "kernel_path", "ops", "quantized_kernels"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def write_tiny_checkpoint(path: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """A randomly initialised transformers model of `model_type`, saved as safetensors."""
    import torch
    import transformers

    hf_config = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    hf_config.update(overrides)
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[model_type]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**hf_config))
    # Random biases, so a missing bias would show in the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    write_byte_tokenizer(path)
    return path


def write_byte_tokenizer(path: Path) -> None:
    """A 256-token byte-level tokenizer (no merges) with a ChatML template: enough to drive the engine."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    byte_to_char = {b: c for b, c in zip(range(256), sorted(alphabet, key=lambda c: _byte_of(c)))}
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's byte -> printable character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    code = ord(char)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Path:
    return write_tiny_checkpoint(tmp_path / "tiny-llama", "llama")


@pytest.fixture
def tiny_qwen2(tmp_path: Path) -> Path:
    return write_tiny_checkpoint(tmp_path / "tiny-qwen2", "qwen2", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct directory, fetched and converted on first use."""
    from engine.assets import resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(params=["fused", "eager"])
def kernel_path(request, monkeypatch) -> str:
    """Runs a test with the fused CPU kernels (skipped where they cannot be built) and again
    with the eager torch ops that replace them elsewhere."""
    from engine import kernels

    if request.param == "fused" and kernels.ops() is None:
        pytest.skip("fused CPU kernels unavailable")
    if request.param == "eager":
        monkeypatch.setattr(kernels, "ops", lambda: None)
    return request.param


@pytest.fixture
def quantized_kernels() -> None:
    """Skips a test where the kernels that read quantized blocks cannot be built."""
    from engine import kernels

    if not hasattr(kernels.ops(), "quant_linear"):
        pytest.skip("quantized CPU kernels unavailable")


@pytest.fixture
def ops():
    """The fused kernels (engine.kernels.ops()), built on first use, not at collection: `make
    test-fast` never builds them. Skips where they cannot be built."""
    from engine import kernels

    library = kernels.ops()
    if library is None:
        pytest.skip("fused CPU kernels unavailable")
    return library
