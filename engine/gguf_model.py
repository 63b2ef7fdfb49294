"""Serve a GGUF file as it is: the architecture from its metadata, the weights in their blocks.

Quantized linear weights and the token embedding stay in the file's blocks
(engine/layers/quantized.py); float tensors (norms, biases) become parameters of the model's
dtype. Where the fused kernels cannot run, every tensor is dequantized at load instead.
"""

from __future__ import annotations

import dataclasses

from collections import defaultdict
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from engine import kernels
from engine.config import ConfigError, ModelConfig
from engine.layers.linear import Linear, pack_linear_weights
from engine.layers.quantized import QUANTIZED_TYPES, QuantizedEmbedding, QuantizedWeight, interleave
from engine.loader import build_empty_model, load_weights, target_of

# general.architecture -> Hugging Face model_type.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
FLOAT_TYPES = {"F32": 0, "F16": 1, "BF16": 30}

# GGUF tensor names -> Hugging Face names; `blk.N.` stands for `model.layers.N.`.
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class GGUFError(ValueError):
    """A GGUF file that cannot be served; the message is one line and names what is wrong."""


class _Reader(gguf.GGUFReader):
    """gguf's reader, reading through a plain ndarray view of its memory map.

    The reader makes a few small arrays per metadata value: a vocabulary of 49k-151k strings
    and as many merges are over a million slices. Sliced from the np.memmap subclass, each pays
    for memmap's __getitem__ and __array_finalize__ in Python: opening SmolLM2's file took 5.3 s,
    and 1.6 s this way. The views still share the mapping (their base holds it open)."""

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None) -> np.ndarray:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        count = int(count)
        array = plain[offset : offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
        return array.view(array.dtype.newbyteorder(override_order or self.byte_order))


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """The file's reader (memory-mapped); a clear error for what is not a whole GGUF file."""
    try:
        return _Reader(path)
    except (ValueError, KeyError, IndexError, OSError) as exc:  # wrong magic, truncated, ...
        raise GGUFError(f"{path} is not a readable GGUF file: {exc}") from None


def field(reader: gguf.GGUFReader, key: str) -> Any:
    value = reader.get_field(key)
    return None if value is None else value.contents()


def config_from_gguf(reader: gguf.GGUFReader) -> ModelConfig:
    """The architecture as a Hugging Face config.json would give it."""
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"unsupported GGUF architecture general.architecture={arch!r}; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    names = {t.name for t in reader.tensors}

    def get(key: str, default: Any = None) -> Any:
        value = field(reader, f"{arch}.{key}")
        if value is None and default is None:
            raise GGUFError(f"the GGUF has no {arch}.{key}")
        return default if value is None else value

    num_heads = get("attention.head_count")
    hidden_size = get("embedding_length")
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    hf: dict[str, Any] = {
        "model_type": ARCHITECTURES[arch],
        "vocab_size": int(embedding.shape[1]),  # GGUF shapes are [in, out]
        "hidden_size": hidden_size,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": get("attention.head_count_kv", num_heads),
        "head_dim": get("attention.key_length", hidden_size // num_heads),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": get("context_length"),
        "rope_theta": get("rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_output.bias" in names,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
    }
    scaling = field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise GGUFError(f"unsupported GGUF rope scaling {arch}.rope.scaling.type={scaling!r}")
        hf["rope_scaling"] = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    try:
        config = ModelConfig.from_hf_dict(hf)
    except ConfigError as exc:
        raise GGUFError(str(exc)) from None
    if ROPE_FREQS in names:
        factors = rope_freq_factors(reader, config.head_dim)
        config = dataclasses.replace(config, rope=dataclasses.replace(config.rope, freq_factors=factors))
    return config


# Llama 3.1+ files: rope scaling as a factor per frequency, [head_dim / 2] float32, which
# llama.cpp's converter computes from the llama3 rope_scaling; not a weight.
ROPE_FREQS = "rope_freqs.weight"


def rope_freq_factors(reader: gguf.GGUFReader, head_dim: int) -> tuple[float, ...]:
    tensor = next(t for t in reader.tensors if t.name == ROPE_FREQS)
    if tensor.tensor_type.name != "F32" or int(np.prod(tensor.shape)) != head_dim // 2:
        raise GGUFError(
            f"unsupported GGUF {ROPE_FREQS}: {tensor.tensor_type.name} {list(tensor.shape)}, "
            f"expected F32 [{head_dim // 2}]"
        )
    factors = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(factors) & (factors > 0)):
        raise GGUFError(f"the GGUF's {ROPE_FREQS} holds factors that are not positive numbers")
    return tuple(float(f) for f in factors)


def hf_name(name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    raise GGUFError(f"unexpected tensor {name!r} in the GGUF")


def _hf_row_order(num_rows: int, num_heads: int) -> np.ndarray:
    """llama.cpp stores a Llama model's q and k rows permuted for its interleaved rotary
    (convert_hf_to_gguf.py's `permute`): row i of the file is row order[i] of the original,
    within each head [2, head_dim / 2] -> [head_dim / 2, 2]. Returns the rows to take, in
    file order, to get the original back."""
    stored = np.arange(num_rows).reshape(num_heads, 2, num_rows // num_heads // 2).swapaxes(1, 2)
    return np.argsort(stored.reshape(num_rows))


def _tensor_rows(tensor: gguf.ReaderTensor, config: ModelConfig, arch_permutes: bool) -> np.ndarray:
    """The tensor's data as [out_features, ...] rows in Hugging Face order, copied out of the
    memory map (blocks stay blocks: a row of a quantized weight is its row_bytes)."""
    data = np.asarray(tensor.data)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else ""
    if arch_permutes and kind in heads:
        return np.ascontiguousarray(data[_hf_row_order(data.shape[0], heads[kind])])
    return np.array(data)


def load_gguf_model(
    reader: gguf.GGUFReader, config: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> nn.Module:
    """The model with its weights from `reader`, quantized ones left in their blocks."""
    model = build_empty_model(config, dtype, device)
    keep_blocks = torch.device(device).type == "cpu" and hasattr(kernels.ops(), "quant_linear")
    arch_permutes = field(reader, "general.architecture") == "llama"
    fused = getattr(model, "fused_weights", {})
    modules = dict(model.named_modules())
    dense: dict[str, torch.Tensor] = {}
    parts: dict[str, list[tuple[int, QuantizedWeight]]] = defaultdict(list)

    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:  # in the config already
            continue
        qtype = tensor.tensor_type.name
        if qtype not in FLOAT_TYPES and qtype not in QUANTIZED_TYPES:
            raise GGUFError(
                f"unsupported GGUF block type {qtype} (tensor {tensor.name}); supported: "
                f"{', '.join([*FLOAT_TYPES, *QUANTIZED_TYPES])}"
            )
        name = hf_name(tensor.name)
        rows = _tensor_rows(tensor, config, arch_permutes)
        if qtype in FLOAT_TYPES or not keep_blocks:
            values = gguf.quants.dequantize(rows, tensor.tensor_type) if qtype in QUANTIZED_TYPES else rows
            dense[name] = torch.from_numpy(np.asarray(values, dtype=np.float32))
            continue
        in_features = int(tensor.shape[0])
        weight = QuantizedWeight(torch.from_numpy(rows).to(device), int(tensor.tensor_type), in_features)
        target, shard = target_of(name, fused)
        parts[target.removesuffix(".weight")].append((shard or 0, weight))

    for module_name, shards in parts.items():
        if module_name == "model.embed_tokens":
            (_, weight), = shards
            if config.tie_word_embeddings:  # one copy of the blocks, in a layout both read
                weight = interleave(weight)
                _attach(model.lm_head, [weight], pack=False)
            model.model.embed_tokens = QuantizedEmbedding(weight, dtype)
            continue
        _attach(modules[module_name], [weight for _, weight in sorted(shards, key=lambda s: s[0])])
    load_weights(model, iter(dense.items()))
    pack_linear_weights(model)
    model.finish_loading()
    return model.eval()


def _attach(linear: nn.Module, weights: list[QuantizedWeight], pack: bool = True) -> None:
    """Give `linear` its blocks (a fused projection's shards in order, runs of one block type
    joined into one part, interleaved where the kernels have that layout) in place of its
    dense weight."""
    assert isinstance(linear, Linear)
    merged: list[QuantizedWeight] = []
    for weight in weights:
        if merged and merged[-1].qtype == weight.qtype:
            blocks = torch.cat([merged[-1].blocks, weight.blocks])
            weight = QuantizedWeight(blocks, weight.qtype, weight.in_features)
            merged.pop()
        merged.append(weight)
    linear.weight = None
    linear.quant_parts = [interleave(weight) for weight in merged] if pack else merged
