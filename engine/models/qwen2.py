"""Qwen2: the Llama decoder with biases on the q/k/v projections (ModelConfig.qkv_bias)."""

from engine.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
