"""Model registry: Hugging Face model_type -> implementation."""

from torch import nn

from engine.config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.models.qwen2 import Qwen2ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    return MODEL_REGISTRY[config.model_type]
