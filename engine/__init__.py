"""Kestrel engine: continuous batching over a paged KV cache, native torch models.

The server uses only what this module exports. Names are imported on first use, so that the
server's settings can read the configs without loading torch (`python -m server --help`).
"""

from __future__ import annotations

import importlib
from typing import Any

# Exported name -> the module that defines it.
_EXPORTS = {
    "AsyncEngine": "engine.async_engine",
    "CacheConfig": "engine.config",
    "EngineConfig": "engine.config",
    "ModelConfig": "engine.config",
    "SchedulerConfig": "engine.config",
    "ContextLengthExceeded": "engine.errors",
    "EngineDead": "engine.errors",
    "EngineOverloaded": "engine.errors",
    "RequestError": "engine.errors",
    "CompiledGrammar": "engine.grammar",
    "GrammarCompiler": "engine.grammar",
    "GrammarError": "engine.grammar",
    "GrammarSpec": "engine.grammar",
    "LLM": "engine.llm",
    "Completion": "engine.llm",
    "GenerationResult": "engine.llm",
    "LLMEngine": "engine.llm_engine",
    "CompletionOutput": "engine.outputs",
    "EngineStats": "engine.outputs",
    "RequestOutput": "engine.outputs",
    "TokenLogprob": "engine.outputs",
    "SamplingParams": "engine.sampling_params",
    "SamplingParamsError": "engine.sampling_params",
    "ChatTemplateError": "engine.tokenizer",
    "Tokenizer": "engine.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value

