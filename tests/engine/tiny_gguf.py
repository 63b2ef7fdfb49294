"""Tiny GGUF files written from tiny Hugging Face checkpoints, the way llama.cpp converts them."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tokenizers.pre_tokenizers import ByteLevel

from tests.conftest import _byte_of, write_tiny_checkpoint

_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf_name: str) -> str:
    module, suffix = hf_name.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, layer, rest = module.split(".", 3)
        return f"blk.{layer}.{_LAYER_NAMES[rest]}.{suffix}"
    return f"{_GLOBAL_NAMES[module]}.{suffix}"


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's permutation of a Llama q / k projection's rows."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(
    directory: Path,
    model_type: str,
    qtype: str,
    seed: int = 0,
    qtypes: dict[str, str] | None = None,
    **overrides,
) -> tuple[Path, Path]:
    """A tiny random model as a GGUF with its 2-D weights in `qtype` blocks (`qtypes` overrides
    that per projection, e.g. {"v_proj": "Q8_0"}), and a Hugging Face directory holding exactly
    the weights the GGUF decodes to (the reference for parity)."""
    qtypes = qtypes or {}
    hf_dir = write_tiny_checkpoint(directory / "hf", model_type, seed=seed, **overrides)
    config = json.loads((hf_dir / "config.json").read_text())
    state = load_file(hf_dir / "model.safetensors")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    arch = model_type
    path = directory / ("-".join(["tiny", model_type, qtype, *qtypes.values()]) + ".gguf")
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    _add_byte_tokenizer(writer)
    if rope_scaling(config).get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(config))

    decoded = {}
    for name, tensor in state.items():
        data = tensor.float().numpy()
        kind = name.split(".")[-2] if name.startswith("model.layers.") else ""
        if arch == "llama" and kind in ("q_proj", "k_proj"):
            data = llama_cpp_permute(data, heads if kind == "q_proj" else kv_heads)
        if data.ndim == 2:
            qt = gguf.GGMLQuantizationType[qtypes.get(kind, qtype)]
            blocks = gguf.quants.quantize(data, qt)
            writer.add_tensor(gguf_name(name), blocks, raw_dtype=qt)
            data = gguf.quants.dequantize(blocks, qt)
            if arch == "llama" and kind in ("q_proj", "k_proj"):  # undo, for the reference
                order = np.argsort(llama_cpp_permute(np.arange(data.shape[0]), heads if kind == "q_proj" else kv_heads))
                data = data[order]
        else:
            writer.add_tensor(gguf_name(name), data)
        decoded[name] = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file(decoded, hf_dir / "model.safetensors")
    return path, hf_dir


def rope_scaling(config: dict) -> dict:
    """The rope settings of a config.json: `rope_parameters` (transformers >= 5) or `rope_scaling`."""
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def llama3_rope_factors(config: dict) -> np.ndarray:
    """What convert_hf_to_gguf.py writes as rope_freqs for a llama3 rope_scaling: per frequency,
    1 where the wavelength is short, `factor` where it is long, and between the cut-offs the
    inverse of the smooth blend, [head_dim / 2] float32."""
    scaling = rope_scaling(config)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    theta = scaling.get("rope_theta", config.get("rope_theta", 10000.0))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * np.pi * theta ** (i / head_dim)
        if wavelength < old_len / high:
            factors.append(1.0)
        elif wavelength > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _add_byte_tokenizer(writer: gguf.GGUFWriter) -> None:
    """The byte-level vocabulary of tests.conftest's tiny checkpoints (id = byte), as GGUF metadata."""
    chars = sorted(ByteLevel.alphabet(), key=_byte_of)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(chars)
    writer.add_token_types([gguf.TokenType.NORMAL] * len(chars))
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
