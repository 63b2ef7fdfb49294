"""What the engine reads of a model, from a Hugging Face directory or a GGUF file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.config import ConfigError, ModelConfig
from engine.sampling_params import GENERATION_CONFIG_KEYS
from engine.tokenizer import Tokenizer


@dataclass
class ModelSource:
    """A model's architecture, tokenizer and sampling defaults, and how to load its weights.

    `generation_defaults` are the sampling values the model's authors set (generation_config.json,
    or the catalogue's for a GGUF file that carries none)."""

    name: str
    path: Path
    config: ModelConfig
    tokenizer: Tokenizer
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    _gguf: Any = None  # the open GGUF reader, dropped once the weights are loaded

    def load(self, dtype: torch.dtype, device: torch.device, quantization: str = "none") -> nn.Module:
        """The model with its weights; `quantization` (int8 | q4) applies to a Hugging Face
        directory's weights, a GGUF file's are quantized already."""
        if self._gguf is None:
            from engine.loader import load_model

            return load_model(self.path, self.config, dtype, device, quantization)
        if quantization != "none":
            raise ConfigError(f"{self.path.name} is a GGUF file, quantized already: leave quantization at none")
        from engine.gguf_model import load_gguf_model

        model = load_gguf_model(self._gguf, self.config, dtype, device)
        self._gguf = None  # closes the memory map: the model holds copies of what it needs
        return model


def open_model(name_or_path: str, chat_template: str | None = None) -> ModelSource:
    """A catalogue name, a Hugging Face directory or a .gguf file (engine.assets.resolve_model)."""
    from engine.assets import resolve_model  # keeps `python -m engine.assets` free of torch

    path = resolve_model(name_or_path)
    name = path.name if Path(name_or_path).expanduser().exists() else name_or_path
    if path.is_dir():
        return ModelSource(
            name,
            path,
            ModelConfig.from_pretrained(path),
            Tokenizer.from_pretrained(path, chat_template=chat_template),
            _generation_defaults(path),
        )
    return _open_gguf(name, path, chat_template)


def _open_gguf(name: str, path: Path, chat_template: str | None) -> ModelSource:
    from engine.assets import entry_of_gguf
    from engine.gguf_model import config_from_gguf, open_gguf
    from engine.gguf_tokenizer import tokenizer_from_gguf

    reader = open_gguf(path)
    config = config_from_gguf(reader)
    entry = entry_of_gguf(path)
    # The catalogue knows what the authors' upstream files say and the GGUF does not.
    eos_token_ids = entry.eos_token_ids if entry else ()
    defaults = dict(entry.generation_defaults) if entry else {}
    tokenizer = tokenizer_from_gguf(reader, chat_template=chat_template, eos_token_ids=eos_token_ids)
    return ModelSource(name, path, config, tokenizer, defaults, reader)


def _generation_defaults(model_dir: Path) -> dict[str, Any]:
    """Sampling defaults the model's authors set in generation_config.json."""
    path = model_dir / "generation_config.json"
    if not path.exists():
        return {}
    config = json.loads(path.read_text())
    return {key: config[key] for key in GENERATION_CONFIG_KEYS if key in config}
