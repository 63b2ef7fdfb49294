"""Our Llama / Qwen2 forward against transformers on the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import ConfigError, ModelConfig
from engine.layers.linear import AMX_MAX_ROWS
from engine.loader import LoadError, load_model
from tests.conftest import write_tiny_checkpoint
from tests.engine.model_driver import greedy_generate, prefill_logits
from tests.engine.parity import PROMPTS, check_parity, hf_greedy, hf_model

pytestmark = pytest.mark.slow  # real or tiny model weights, kernel builds or servers

@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_tiny_model_matches_transformers(tmp_path, model_type, kernel_path):
    check_parity(write_tiny_checkpoint(tmp_path / model_type, model_type))


def test_tied_embeddings_and_attention_bias(tmp_path):
    check_parity(
        write_tiny_checkpoint(tmp_path / "m", "llama", tie_word_embeddings=True, attention_bias=True)
    )


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 16},
        {"rope_type": "linear", "factor": 4.0},
    ],
    ids=["llama3", "linear"],
)
def test_scaled_rope_matches_transformers(tmp_path, scaling):
    path = write_tiny_checkpoint(tmp_path / "m", "llama", rope_scaling=scaling, rope_theta=5000.0)
    assert ModelConfig.from_pretrained(path).rope.rope_type == scaling["rope_type"]
    check_parity(path)


def test_real_default_model_greedy_matches_transformers(default_model_dir):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You are a terse assistant."},
         {"role": "user", "content": "List three colours."}],
        [{"role": "user", "content": "Write a haiku about the sea."}],
        [{"role": "user", "content": "Explain what a hash table is, in detail, with an example in Python."}],
    ]
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in chats]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    ours = load_model(default_model_dir, dtype=torch.float32)
    ref = hf_model(default_model_dir)
    assert greedy_generate(ours, prompts, 32) == [hf_greedy(ref, p, 32) for p in prompts]


def _rewrite(path, change) -> None:
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tiny_llama):
    _rewrite(tiny_llama, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(LoadError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'"):
        load_model(tiny_llama)


def test_wrong_shape_is_named(tiny_llama):
    def shrink(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:, :10].clone()

    _rewrite(tiny_llama, shrink)
    with pytest.raises(LoadError, match=r"shape mismatch for 'model\.layers\.0\.mlp\.up_proj\.weight': checkpoint \(128, 10\), model expects \(128, 64\)"):
        load_model(tiny_llama)


def test_unknown_architecture_is_named(tiny_llama):
    config = json.loads((tiny_llama / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tiny_llama / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"unsupported architecture: model_type 'gpt2' \(GPT2LMHeadModel\)"):
        load_model(tiny_llama)


def test_unknown_rope_type_is_named(tiny_llama):
    config = json.loads((tiny_llama / "config.json").read_text())
    # The pre-transformers-5 spelling: rope_theta beside rope_scaling.
    config.pop("rope_parameters", None)
    config.update(rope_theta=10000.0, rope_scaling={"type": "yarn", "factor": 4.0})
    (tiny_llama / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="unsupported rope type 'yarn'"):
        ModelConfig.from_pretrained(tiny_llama)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    import transformers

    single = write_tiny_checkpoint(tmp_path / "single", "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(single)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    sharded = tmp_path / "sharded"
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    a = load_model(single, dtype=torch.float32).state_dict()
    b = load_model(sharded, dtype=torch.float32).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_real_default_model_bf16_logits_stay_close_to_transformers(default_model_dir):
    """bf16 cannot match bit for bit (matmuls round differently on each CPU), so both bf16
    results are held against transformers in float32: ours must stray from it no further than
    transformers' own bf16 does. Rounding the norm as the reference does matters: scaling in
    float32 first once put our gap at 1.3, twice the reference's, and flipped this prompt's
    greedy answer. In float32 the two agree closely."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    prompt = list(tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, tokenize=True, return_dict=True,
    )["input_ids"])

    def reference(dtype):
        ref = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=dtype)
        with torch.inference_mode():
            return ref(torch.tensor([prompt])).logits[0, -1].float()

    def ours(dtype):
        return prefill_logits(load_model(default_model_dir, dtype=dtype), [prompt])[0][-1]

    exact = reference(torch.float32)
    ours32 = ours(torch.float32)
    assert (ours32 - exact).abs().max() < 1e-2
    assert torch.equal(ours32.topk(3).indices, exact.topk(3).indices)
    their_gap = (reference(torch.bfloat16) - exact).abs().max()
    our_gap = (ours(torch.bfloat16) - exact).abs().max()
    assert our_gap < 1.5 * their_gap, (our_gap, their_gap)


def skip_unless_kernel_linears(model) -> None:
    """Skip where the linears run neither the FMA nor the AMX kernel: then no fused stack is
    expected (on a CPU with AVX-512 and no AMX, oneDNN's packed bf16 matmul is chosen)."""
    qkv = model.model.layers[0].self_attn.qkv_proj
    if qkv.fma_weight is None and qkv.amx_weight is None:
        pytest.skip("neither the FMA nor the AMX linear is chosen on this CPU")


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # qwen2: biases on q/k/v
def test_fused_decoder_stack_equals_the_modules_to_the_bit(tmp_path, model_type):
    """bf16 on a CPU with the FMA or the AMX linear: all decoder layers run in one kernel call,
    computing exactly what the Python modules compute when they call the same kernels one by one
    (with AMX, for steps the AMX kernel takes)."""
    model = load_model(write_tiny_checkpoint(tmp_path / model_type, model_type), dtype=torch.bfloat16)
    skip_unless_kernel_linears(model)
    stack = model.model.fused_stack
    assert stack is not None and stack.takes(sum(len(p) for p in PROMPTS))
    if model.model.layers[0].self_attn.qkv_proj.amx_weight is not None:
        assert not stack.takes(AMX_MAX_ROWS + 1)  # beyond, the modules run oneDNN
    fused = (prefill_logits(model, PROMPTS), greedy_generate(model, PROMPTS, 8))
    model.model.fused_stack = None  # the module path from here on
    modules = (prefill_logits(model, PROMPTS), greedy_generate(model, PROMPTS, 8))
    assert all(torch.equal(a, b) for a, b in zip(fused[0], modules[0], strict=True))
    assert fused[1] == modules[1]


def test_fused_decoder_stack_declines_other_biases(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "m", "llama", attention_bias=True)  # o_proj has a bias too
    model = load_model(path, dtype=torch.bfloat16)
    skip_unless_kernel_linears(model)
    assert model.model.fused_stack is None
