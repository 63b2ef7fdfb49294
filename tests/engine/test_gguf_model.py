"""engine.gguf_model: GGUF files served as they are, against transformers on the weights they decode to."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import torch

from engine import kernels
from engine.assets import fetch_gguf, resolve_model
from engine.config import ModelConfig
from engine.gguf_model import GGUFError, config_from_gguf, load_gguf_model, open_gguf
from engine.layers import quantized
from engine.loader import weight_bytes
from engine.tokenizer import Tokenizer
from tests.engine.model_driver import greedy_generate, prefill_logits
from tests.engine.parity import check_parity
from tests.engine.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.slow  # tiny models through transformers, real GGUF files

CHATS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
TINY_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # what the gguf package can quantize


def has_quantized_kernels() -> bool:
    return hasattr(kernels.ops(), "quant_linear")


def linear_type(qtype: str) -> int:
    """The type id a linear's part of GGUF type `qtype` runs as: interleaved where the build can
    (the tiny models' out_features are all multiples of 16)."""
    ggml_id = int(gguf.GGMLQuantizationType[qtype])
    if hasattr(kernels.ops(), "quant_pack") and ggml_id in quantized.INTERLEAVED_TYPES:
        return quantized.INTERLEAVED_TYPE_BASE + ggml_id
    return ggml_id


def float_kernels_only(monkeypatch) -> None:
    monkeypatch.setattr(quantized, "INTERLEAVED_TYPES", frozenset())


@pytest.mark.parametrize("qtype", TINY_TYPES)
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # llama: q / k rows permuted in the file
def test_tiny_gguf_matches_transformers_on_its_decoded_weights(tmp_path, monkeypatch, model_type, qtype):
    """The weights as the file holds them, run by the float kernels (no repacking for integer dot
    products, whose rounding of the activations the next test bounds)."""
    float_kernels_only(monkeypatch)
    path, reference_dir = write_tiny_gguf(tmp_path, model_type, qtype, tie_word_embeddings=model_type == "qwen2")
    reader = open_gguf(path)
    config = config_from_gguf(reader)
    expected = ModelConfig.from_pretrained(reference_dir)
    assert config == dataclasses.replace(expected, rms_norm_eps=float(np.float32(expected.rms_norm_eps)))
    model = load_gguf_model(reader, config, torch.float32)
    if has_quantized_kernels():  # the blocks stay blocks
        layer = model.model.layers[0]
        assert layer.self_attn.qkv_proj.weight is None and layer.self_attn.qkv_proj.quant_parts
        assert layer.mlp.down_proj.quant_parts[0].qtype == gguf.GGMLQuantizationType[qtype]
    check_parity(reference_dir, ours=model)


# (type, the largest logit difference allowed), on 16-bit activations (observed: at most 1.9e-5 on
# logits up to 0.65)
REPACKED = [("Q5_0", 2e-4), ("Q4_1", 2e-4), ("Q8_0", 2e-4)]


@pytest.mark.parametrize(("qtype", "atol"), REPACKED, ids=[qtype for qtype, _ in REPACKED])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_repacked_linears_stay_near_the_float_ones(tmp_path, monkeypatch, model_type, qtype, atol):
    """Where the build repacks a type for integer dot products, every linear of that type runs
    repacked, and the logits stay within the activations' rounding of the float kernels'."""
    if linear_type(qtype) == int(gguf.GGMLQuantizationType[qtype]):
        pytest.skip(f"this build has no interleaved {qtype} linear (it needs AVX2 or AVX-512)")
    path, _ = write_tiny_gguf(tmp_path, model_type, qtype, tie_word_embeddings=model_type == "qwen2")
    reader = open_gguf(path)
    config = config_from_gguf(reader)
    packed = load_gguf_model(reader, config, torch.float32)
    layers = packed.model.layers
    assert {part.qtype for layer in layers for part in layer.mlp.down_proj.quant_parts} == {linear_type(qtype)}
    if config.tie_word_embeddings:  # one copy of the blocks: interleaved where the head's type can be
        (head,) = packed.lm_head.quant_parts
        assert packed.model.embed_tokens.weight_blocks is head
    float_kernels_only(monkeypatch)
    plain = load_gguf_model(reader, config, torch.float32)
    prompts = [list(b"The capital of France is"), list(b"1, 2, 3,"), list(b"x")]
    for got, want in zip(prefill_logits(packed, prompts), prefill_logits(plain, prompts), strict=True):
        assert not torch.equal(got, want)  # the activations were rounded
        torch.testing.assert_close(got, want, atol=atol, rtol=0.0)


def test_llama3_rope_freqs_match_transformers_rope_scaling(tmp_path):
    """Llama 3.1+ GGUFs carry rope scaling as rope_freqs factors: the tiny model, written with
    them as llama.cpp's converter does, agrees with transformers running the llama3 rope_scaling
    (cut-offs set so that its 8 frequencies fall in all three bands)."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # fmt: skip
    path, reference_dir = write_tiny_gguf(tmp_path, "llama", "Q8_0", rope_scaling=scaling)
    reader = open_gguf(path)
    config = config_from_gguf(reader)
    factors = np.array(config.rope.freq_factors)
    assert config.rope.rope_type == "default" and factors.shape == (8,)
    assert factors[0] == 1.0 and factors[-1] == 8.0 and np.any((factors > 1) & (factors < 8))
    check_parity(reference_dir, ours=load_gguf_model(reader, config, torch.float32))


@pytest.mark.parametrize(
    ("qtype", "qtypes"),
    [("Q4_1", {}), ("Q8_0", {}), ("Q5_0", {"v_proj": "Q8_0"})],  # the last: Qwen2.5 Q4_K_M's mixed qkv
    ids=["Q4_1", "Q8_0", "Q5_0-v-Q8_0"],
)
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # qwen2: q/k/v biases
def test_fused_stack_on_gguf_blocks_equals_the_modules_to_the_bit(tmp_path, model_type, qtype, qtypes):
    """Every layer linear in GGUF blocks (a qkv whose shards differ in type in one part per
    type): all decoder layers run in one kernel call, which computes exactly what the modules
    compute calling the same kernels one by one."""
    path, _ = write_tiny_gguf(tmp_path, model_type, qtype, qtypes=qtypes)
    reader = open_gguf(path)
    model = load_gguf_model(reader, config_from_gguf(reader), torch.bfloat16)
    if not has_quantized_kernels() or not hasattr(kernels.ops(), "decoder_layers"):
        pytest.skip("no fused decoder stack in this build (it needs AVX2 + FMA)")
    stack = model.model.fused_stack
    expected_types = {linear_type(t) for t in (qtype, *qtypes.values())}
    assert stack is not None and set(stack.linear_types) == expected_types
    # q and k in one part, v in another when their types differ: 2 parts, else 1.
    assert stack.linear_parts[0] == (2 if qtypes else 1) and set(stack.linear_parts[1:4]) == {1}
    prompts = [list(b"The capital of France is"), list(b"1, 2, 3,"), list(b"x")]
    fused = (prefill_logits(model, prompts), greedy_generate(model, prompts, 8))
    model.model.fused_stack = None  # the module path from here on
    modules = (prefill_logits(model, prompts), greedy_generate(model, prompts, 8))
    assert all(torch.equal(a, b) for a, b in zip(fused[0], modules[0], strict=True))
    assert fused[1] == modules[1]


def write_gguf(path, arch="llama", tensors=()):
    writer = gguf.GGUFWriter(path, arch)
    for name, data, qtype in tensors:
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_files_get_one_line_errors(tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(GGUFError, match="not a readable GGUF file.*magic"):
        open_gguf(not_gguf)

    path, _ = write_tiny_gguf(tmp_path, "llama", "Q8_0")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        open_gguf(truncated)

    other = write_gguf(tmp_path / "bert.gguf", arch="bert")
    with pytest.raises(GGUFError, match="unsupported GGUF architecture general.architecture='bert'"):
        config_from_gguf(open_gguf(other))


def test_unknown_block_types_are_named(tmp_path):
    path, _ = write_tiny_gguf(tmp_path, "llama", "Q8_0")
    reader = open_gguf(path)
    config = config_from_gguf(reader)
    # The same file with one weight in a block type the kernels do not read.
    iq = gguf.GGMLQuantizationType.IQ4_NL
    tensors = [
        (t.name, np.asarray(t.data), iq if t.name == "blk.1.ffn_down.weight" else t.tensor_type)
        for t in reader.tensors
    ]
    odd = write_gguf(tmp_path / "odd.gguf", tensors=[t for t in tensors if t[0] != "blk.1.ffn_down.weight"]
                     + [("blk.1.ffn_down.weight", np.zeros((64, 72), np.uint8), iq)])  # fmt: skip
    with pytest.raises(GGUFError, match="unsupported GGUF block type IQ4_NL \\(tensor blk.1.ffn_down.weight\\)"):
        load_gguf_model(open_gguf(odd), config, torch.float32)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_catalogue_gguf_config_equals_the_converted_directory(name):
    entry_name = {"smollm2-135m-instruct": "smollm2-135m-instruct-q4_1",
                  "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b-instruct-q4_k_m"}[name]  # fmt: skip
    path = resolve_model(entry_name)
    assert path == fetch_gguf(name) and path.suffix == ".gguf"
    reader = open_gguf(path)
    assert config_from_gguf(reader) == ModelConfig.from_pretrained(resolve_model(name))


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_reader_reads_what_ggufs_own_reader_reads(name):
    """open_gguf's faster reader: every metadata value and every tensor (type, shape, bytes) as
    the gguf package's GGUFReader gives them."""
    path = fetch_gguf(name)
    ours, reference = open_gguf(path), gguf.GGUFReader(path)
    assert list(ours.fields) == list(reference.fields)
    for key, field in reference.fields.items():
        assert ours.fields[key].contents() == field.contents(), key
    assert len(ours.tensors) == len(reference.tensors)
    for a, b in zip(ours.tensors, reference.tensors, strict=True):
        assert (a.name, a.tensor_type, list(a.shape), a.data_offset) == (b.name, b.tensor_type, list(b.shape), b.data_offset)
        assert np.array_equal(a.data, b.data), a.name


def test_smollm2_q4_1_weights_stay_quantized_and_agree_with_bf16(quantized_kernels):
    """The Q4_1 file as is: its resident weights are no larger than the file, and along the bf16
    model's greedy answers (converted from the same file) it predicts the same next token, but
    where bf16 itself nearly ties."""
    from engine.loader import load_model

    path = fetch_gguf("smollm2-135m-instruct")
    reader = open_gguf(path)
    config = config_from_gguf(reader)
    model = load_gguf_model(reader, config, torch.bfloat16)
    assert weight_bytes(model) <= 1.1 * path.stat().st_size
    reference = load_model(resolve_model("smollm2-135m-instruct"), config, torch.bfloat16)
    tokenizer = Tokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    prompts = [tokenizer.encode_chat([{"role": "user", "content": c}]) for c in CHATS]
    answers = greedy_generate(reference, prompts, 24)
    # Teacher-forced on bf16's answers: free-running answers part at the first near-tie (Q4_1
    # decoded exactly in float32 vs rounded to bf16; on an AMX CPU, "List three prime numbers."
    # opens "1." in bf16 and "The" in Q4_1), after which nothing is compared.
    texts = [p + a for p, a in zip(prompts, answers, strict=True)]
    agree = total = 0
    for prompt, ours, theirs in zip(prompts, prefill_logits(model, texts), prefill_logits(reference, texts), strict=True):
        ours, theirs = ours[len(prompt) - 1 : -1].float(), theirs[len(prompt) - 1 : -1].float()
        top2 = theirs.topk(2).values
        same = ours.argmax(-1) == theirs.argmax(-1)
        assert ((top2[:, 0] - top2[:, 1])[~same] < 0.5).all(), "a token bf16 is sure of differs"
        agree, total = agree + int(same.sum()), total + len(same)
    assert agree >= 0.9 * total, (agree, total)
