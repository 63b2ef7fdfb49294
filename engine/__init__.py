"""Kestrel engine: continuous batching over a paged KV cache, native torch models.

The server uses only what this module exports.
"""

from engine.async_engine import AsyncEngine
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.errors import ContextLengthExceeded, EngineDead, EngineOverloaded, RequestError
from engine.llm import LLM, Completion, GenerationResult
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, EngineStats, RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams, SamplingParamsError
from engine.tokenizer import ChatTemplateError, Tokenizer

__all__ = [
    "LLM",
    "AsyncEngine",
    "CacheConfig",
    "ChatTemplateError",
    "Completion",
    "CompletionOutput",
    "ContextLengthExceeded",
    "EngineConfig",
    "EngineDead",
    "EngineOverloaded",
    "EngineStats",
    "GenerationResult",
    "LLMEngine",
    "ModelConfig",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "SamplingParamsError",
    "SchedulerConfig",
    "TokenLogprob",
    "Tokenizer",
]
