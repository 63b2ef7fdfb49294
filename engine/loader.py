"""Load safetensors checkpoints (single file or sharded) straight into a model's parameters."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from engine import kernels
from engine.config import ConfigError, ModelConfig
from engine.layers.linear import MergedLinear, pack_linear_weights
from engine.models import model_class
from engine.quantize import quantize_model

# Checkpoint tensors that carry nothing this implementation needs.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class LoadError(ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise LoadError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def iter_checkpoint(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, one tensor in memory at a time (the files are memory-mapped)."""
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                yield name, f.get_tensor(name)


def load_model(
    model_dir: str | Path,
    config: ModelConfig | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    quantization: str = "none",
) -> nn.Module:
    """Build the model for `model_dir` with uninitialised storage and fill it from safetensors;
    `quantization` (int8 | q4) puts the linears' weights in blocks (engine/quantize.py)."""
    model_dir = Path(model_dir)
    config = config or ModelConfig.from_pretrained(model_dir)
    model = build_empty_model(config, dtype, device)
    load_weights(model, iter_checkpoint(model_dir))
    if quantization != "none":
        if torch.device(device).type != "cpu" or not hasattr(kernels.ops(), "quant_linear"):
            raise ConfigError(f"quantization {quantization!r} needs the fused CPU kernels (engine/kernels)")
        quantize_model(model, quantization)
    # The AMX kernel needs its own copy of the weights beside oneDNN's packed one: worth it for
    # small models, not for one whose second copy would crowd out the rest of the memory.
    pack_linear_weights(model, amx_copy_budget=available_memory_bytes() // 4)
    model.finish_loading()
    return model.eval()


def build_empty_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """The model for `config` with uninitialised storage of `dtype` on `device`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_class(config)(config)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes the weights take as they run: parameters, pre-packed copies and quantized blocks
    (modules list what they hold besides parameters in `weight_tensors()`), each once."""
    tensors = {id(p): p for p in model.parameters()}
    for module in model.modules():
        if hasattr(module, "weight_tensors"):
            tensors.update((id(t), t) for t in module.weight_tensors())
    return sum(t.numel() * t.element_size() for t in tensors.values())


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else a conservative 4 GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into `model`; every parameter must be filled exactly once."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    fused = getattr(model, "fused_weights", {})
    tied = getattr(model.config, "tie_word_embeddings", False)
    expected = _expected_targets(params, modules)
    loaded: set[tuple[str, int | None]] = set()

    for name, tensor in weights:
        if name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        target, shard = target_of(name, fused)
        if target not in params:
            raise LoadError(f"checkpoint tensor {name!r} has no matching parameter in the model")
        param = params[target]
        dest = param.data
        if shard is not None:
            module = modules[target.rsplit(".", 1)[0]]
            dest = dest[module.shard_rows(shard)]
        if tuple(tensor.shape) != tuple(dest.shape):
            raise LoadError(
                f"shape mismatch for {name!r}: checkpoint {tuple(tensor.shape)}, "
                f"model expects {tuple(dest.shape)}"
            )
        with torch.no_grad():
            dest.copy_(tensor)
        loaded.add((target, shard))

    missing = [key for key in expected if key not in loaded]
    if missing:
        target, shard = missing[0]
        hf_name = _hf_name(target, shard, fused)
        raise LoadError(
            f"checkpoint is missing tensor {hf_name!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )


def target_of(name: str, fused: dict[str, tuple[str, int]]) -> tuple[str, int | None]:
    """Parameter name and shard index for a checkpoint tensor name."""
    for hf_proj, (our_proj, shard) in fused.items():
        part = f".{hf_proj}."
        if part in name:
            return name.replace(part, f".{our_proj}."), shard
    return name, None


def _hf_name(target: str, shard: int | None, fused: dict[str, tuple[str, int]]) -> str:
    if shard is None:
        return target
    for hf_proj, (our_proj, our_shard) in fused.items():
        if our_shard == shard and f".{our_proj}." in target:
            return target.replace(f".{our_proj}.", f".{hf_proj}.")
    return target


def _expected_targets(
    params: dict[str, nn.Parameter], modules: dict[str, nn.Module]
) -> list[tuple[str, int | None]]:
    expected = []
    for name in params:
        module = modules[name.rsplit(".", 1)[0]]
        if isinstance(module, MergedLinear):
            expected += [(name, shard) for shard in range(len(module.output_sizes))]
        else:
            expected.append((name, None))
    return expected
