"""engine.quantize: weights quantized at load, byte for byte as the gguf package would, and models
that then compute what transformers computes with the weights those blocks decode to."""

from __future__ import annotations

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import ConfigError
from engine.loader import load_model
from engine.quantize import QUANTIZATIONS, quantize_q4_1, quantize_q8_0
from tests.conftest import write_tiny_checkpoint
from tests.engine.parity import check_parity


@pytest.mark.parametrize("quantize, qtype", [(quantize_q8_0, "Q8_0"), (quantize_q4_1, "Q4_1")])
@pytest.mark.parametrize("scale", [1.0, 0.02, 1e-6])
def test_blocks_equal_the_gguf_reference_quantizer(quantize, qtype, scale):
    torch.manual_seed(0)
    weight = torch.randn(48, 256) * scale
    weight[3, :32] = 0  # an all-zero block: scale 0
    weight[5, 7] = 300 * scale  # an outlier
    weight[6, 40:72] = 0.49999997 * scale  # near a rounding boundary
    expected = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType[qtype])
    assert (quantize(weight).numpy() == expected).all()
    bf16 = weight.to(torch.bfloat16)
    assert (quantize(bf16).numpy() == gguf.quants.quantize(bf16.float().numpy(), gguf.GGMLQuantizationType[qtype])).all()


def decoded_checkpoint(path, quantization: str, tied: bool):
    """`path`'s checkpoint with each quantized weight replaced by what its blocks decode to."""
    state = load_file(path / "model.safetensors")
    for name, tensor in state.items():
        if tensor.dim() == 2 and name != "model.embed_tokens.weight":
            qtype = "Q8_0" if name == "lm_head.weight" else QUANTIZATIONS[quantization]
            blocks = gguf.quants.quantize(tensor.float().numpy(), gguf.GGMLQuantizationType[qtype])
            state[name] = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]))
    if tied:  # the embedding is the output projection's blocks too
        blocks = gguf.quants.quantize(state["model.embed_tokens.weight"].numpy(), gguf.GGMLQuantizationType.Q8_0)
        state["model.embed_tokens.weight"] = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0))
    save_file(state, path / "model.safetensors")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "q4"])
@pytest.mark.parametrize("tied", [False, True])
def test_quantized_tiny_model_matches_transformers_on_the_decoded_weights(tmp_path, quantization, tied, quantized_kernels):
    path = write_tiny_checkpoint(tmp_path / "m", "llama", tie_word_embeddings=tied, hidden_size=64, intermediate_size=128)
    ours = load_model(path, dtype=torch.float32, quantization=quantization)
    down = ours.model.layers[0].mlp.down_proj
    block_bytes = {"int8": 34, "q4": 20}[quantization]  # per 32 weights
    assert down.weight is None and down.quant_parts[0].num_bytes == 64 * 128 // 32 * block_bytes
    head = ours.lm_head.quant_parts[0]
    assert head.num_bytes == 256 * 64 // 32 * 34  # Q8_0
    if tied:  # one copy of the blocks serves both
        assert ours.model.embed_tokens.weight_blocks is head
    reference = write_tiny_checkpoint(tmp_path / "ref", "llama", tie_word_embeddings=tied, hidden_size=64, intermediate_size=128)
    check_parity(decoded_checkpoint(reference, quantization, tied), ours=ours)


@pytest.mark.slow
def test_a_gguf_file_is_not_quantized_again(tmp_path):
    from engine.model_source import open_model
    from tests.engine.tiny_gguf import write_tiny_gguf

    path, _ = write_tiny_gguf(tmp_path, "llama", "Q8_0")
    with pytest.raises(ConfigError, match="GGUF file, quantized already"):
        open_model(str(path)).load(torch.float32, torch.device("cpu"), "int8")
