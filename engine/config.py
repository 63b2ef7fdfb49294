"""Frozen configuration records: the model's architecture and the engine's knobs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A model directory or engine setting that Kestrel cannot use."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # GGUF's rope_freqs (Llama 3.1 and later): each inverse frequency divided by its factor
    freq_factors: tuple[float, ...] = ()

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> RopeConfig:
        """Read `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling`."""
        params = dict(hf.get("rope_scaling") or {})
        params.update(hf.get("rope_parameters") or {})
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        rope = cls(theta=float(theta), rope_type=rope_type)
        if rope_type == "default":
            return rope
        fields: dict[str, Any] = {"factor": float(params["factor"])}
        if rope_type == "llama3":
            fields |= {
                "low_freq_factor": float(params["low_freq_factor"]),
                "high_freq_factor": float(params["high_freq_factor"]),
                "original_max_position_embeddings": int(params["original_max_position_embeddings"]),
            }
        return cls(theta=float(theta), rope_type=rope_type, **fields)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder, read from a Hugging Face config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json in {model_dir}") from None
        return cls.from_hf_dict(hf)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = ", ".join(hf.get("architectures") or []) or "unknown"
            raise ConfigError(
                f"unsupported architecture: model_type {model_type!r} ({archs}); "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"unsupported activation {act!r} (only silu)")
        if model_type == "mistral" and hf.get("sliding_window") is not None:
            raise ConfigError("sliding-window attention (mistral sliding_window) is not supported")
        num_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope=RopeConfig.from_hf(hf),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            # Qwen2 always has q/k/v biases (and none on o_proj); Llama's attention_bias covers all four.
            qkv_bias=model_type == "qwen2" or hf.get("attention_bias", False),
            o_proj_bias=model_type != "qwen2" and hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    @property
    def attention_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # KV pool size: bytes if set, else this fraction of the memory available at start-up.
    memory_bytes: int | None = 2 * 2**30
    memory_fraction: float = 0.25
    # Reuse the cached keys and values of full blocks a new prompt shares with an earlier one
    # (a system prompt, the earlier turns of a chat).
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences decoding together in one step
    max_num_batched_tokens: int = 2048  # tokens (prefill chunks + decodes) in one step
    max_waiting: int = 256  # queued requests beyond which new ones are refused
    # Query-key pairs the prompt chunks of one step may attend over, a chunk of c tokens after p
    # computed ones counting c * (p + c); None: no bound. On a CPU a chunk's attention grows with
    # its context: SmolLM2 on 2 cores spent 4.7 s on one 2,048-token chunk at positions
    # 2,048-3,334 (~1 us a pair), stopping every decode for as long. This bound keeps a step's
    # prompt attention near 0.25 s; a long prompt takes more, shorter chunks, the same work.
    max_prefill_attention: int | None = 262_144
    # Prompt-lookup speculative decoding (engine/speculation.py): draft tokens verified per
    # greedy sequence and step, while at most `speculative_max_seqs` sequences run. 0: off.
    # Draft rows cost arithmetic: on a 2-core AVX2 CPU, 4 sequences with drafts (20 rows) made
    # a step slower than the tokens it gained (serving 80 -> 75 tok/s); 1 gained 10%.
    speculative_tokens: int = 4
    speculative_max_seqs: int = 1

    def __post_init__(self) -> None:
        if self.max_prefill_attention is not None and self.max_prefill_attention < 1:
            raise ConfigError("max_prefill_attention must be at least 1 (or unset: no bound)")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                "max_num_batched_tokens must be at least max_num_seqs, so every running "
                "sequence can decode in each step"
            )


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2-135m-instruct"  # catalogue name or Hugging Face directory
    dtype: str = "bfloat16"  # bfloat16 | float32 | float16
    quantization: str = "none"  # none | int8 | q4: linears quantized at load (engine/quantize.py)
    device: str = "cpu"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    chat_template: str | None = None  # path to a template overriding the model's
    num_threads: int | None = None  # torch intra-op threads; None: torch's default
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
