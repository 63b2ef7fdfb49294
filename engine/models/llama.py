"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral without sliding window) in plain torch."""

from __future__ import annotations

import torch
from torch import nn

from engine.config import ModelConfig
from engine.layers.activation import GatedMLP
from engine.layers.attention import AttentionMetadata, KVCache, paged_attention, rotate_and_cache
from engine.layers.linear import Linear, MergedLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, RotaryInputs
from engine.models.fused_stack import FusedDecoderStack


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.attention_scale
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            config.hidden_size, [q_size, kv_size, kv_size], bias=config.qkv_bias
        )
        self.o_proj = Linear(q_size, config.hidden_size, bias=config.o_proj_bias)

    def forward(
        self, hidden: torch.Tensor, rope: RotaryInputs, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        q, k, v = rotate_and_cache(
            self.qkv_proj(hidden), rope, self.num_heads, self.num_kv_heads, kv_cache, meta.slot_mapping
        )
        out = paged_attention(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(hidden.shape[0], self.num_heads * self.head_dim))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RotaryInputs,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the next norm adds the two."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, rope, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope)
        # All decoder layers in one kernel call, where it can run them: set by finish_loading.
        self.fused_stack: FusedDecoderStack | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [num_tokens, hidden_size]
        rope = self.rotary_emb(positions, hidden.dtype)
        if self.fused_stack is not None and meta.paged is not None and self.fused_stack.takes(len(input_ids)):
            return self.fused_stack(hidden, rope, kv_caches, meta)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, rope, kv_cache, meta)
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Causal LM head over LlamaModel. Parameter names follow Hugging Face's checkpoints."""

    # Checkpoint projection -> (fused module, shard index) in this implementation.
    fused_weights = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Final hidden states, [num_tokens, hidden_size]."""
        return self.model(input_ids, positions, kv_caches, meta)

    def finish_loading(self) -> None:
        """Called once the weights are loaded and packed for their kernels."""
        self.model.fused_stack = FusedDecoderStack.build(self.model.layers, self.model.norm, self.config)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [num_rows, vocab_size] for the selected rows of hidden states."""
        return self.lm_head(hidden).float()
