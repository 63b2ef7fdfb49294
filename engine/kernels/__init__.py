"""Fused CPU kernels (the C++ sources in this folder): a library prebuilt for this CPU's
instruction-set level if one is installed (engine/kernels/prebuilt, as in the Docker image), else
compiled on first use for this CPU (-march=native) and cached under $KESTREL_HOME.

`ops()` returns `torch.ops.kestrel` once the library is loaded, or None where it cannot be
(no prebuilt library for this CPU and no C++ compiler, or KESTREL_KERNELS=0; logged as an
error unless disabled): every caller keeps an eager torch path that computes the same thing,
which is also what runs on other devices.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Protocol, cast

import torch

from engine.kernels.build import (
    FLAGS,
    KERNEL_DIR,
    LIBRARY_NAME,
    PREBUILT_DIR,
    SOURCES,
    VARIANTS,
    Variant,
    build,
    build_many,
    cache_key,
    choose_prebuilt,
    prebuilt_path,
)

__all__ = [
    "FLAGS", "KERNEL_DIR", "PREBUILT_DIR", "SOURCES", "VARIANTS", "Variant", "build_many",
    "choose_prebuilt", "prebuilt_path",
]  # fmt: skip

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_state: dict[str, object] = {}


class KernelOps(Protocol):
    """torch.ops.kestrel: the ops the sources register (quant_* in quant_ops.cpp, the rest in
    cpu_ops.cpp, which cpu_ops.h maps to their files). fma_linear and decoder_layers exist only
    in builds for CPUs with AVX2 + FMA, quant_pack with AVX2 + FMA + F16C or AVX-512, amx_linear only with AMX
    (check with hasattr)."""

    def rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor: ...
    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor: ...
    def rotary_and_store(
        self, qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
        num_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    ) -> None: ...
    def paged_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
        query_starts: torch.Tensor, context_lens: torch.Tensor, scale: float,
    ) -> torch.Tensor: ...
    def fma_linear(self, x: torch.Tensor, w_panels: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...
    def amx_linear(self, x: torch.Tensor, w_tiles: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...
    def quant_linear(
        self, x: torch.Tensor, blocks: torch.Tensor, qtype: int, in_features: int, bias: torch.Tensor | None
    ) -> torch.Tensor: ...
    def quant_pack(self, blocks: torch.Tensor, qtype: int, in_features: int) -> torch.Tensor: ...
    def quant_dequantize(
        self, blocks: torch.Tensor, qtype: int, in_features: int, row_ids: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor: ...
    def decoder_layers(
        self, hidden: torch.Tensor, input_norms: list[torch.Tensor], post_norms: list[torch.Tensor],
        linear_weights: list[torch.Tensor], linear_types: list[int], linear_parts: list[int],
        qkv_biases: list[torch.Tensor | None], final_norm: torch.Tensor,
        eps: float, num_heads: int, num_kv_heads: int, positions: torch.Tensor, cos: torch.Tensor,
        sin: torch.Tensor, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
        slot_mapping: torch.Tensor, block_tables: torch.Tensor, query_starts: torch.Tensor,
        context_lens: torch.Tensor, scale: float,
    ) -> torch.Tensor: ...


def enabled() -> bool:
    return os.environ.get("KESTREL_KERNELS", "1") not in ("0", "false", "no", "off")


def ops() -> KernelOps | None:
    """torch.ops.kestrel, building the library on the first call; None if unavailable."""
    try:
        return _state["ops"]  # type: ignore[return-value]  # the hot path: every fused op call asks
    except KeyError:
        with _lock:
            if "ops" not in _state:
                _state["ops"] = _load() if enabled() else None
        return _state["ops"]  # type: ignore[return-value]


KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def use_for(x: torch.Tensor) -> KernelOps | None:
    """The fused ops if they apply to tensors like `x` (CPU, float32 or bf16), else None."""
    return ops() if x.device.type == "cpu" and x.dtype in KERNEL_DTYPES else None


def amx_linear_fits(weight: torch.Tensor) -> bool:
    """Whether the AMX linear can take this weight: bf16 on a CPU with AMX, the OS permitting
    it, [out, in] with out % 16 == 0 and in % 32 == 0."""
    out_features, in_features = weight.shape
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or out_features % 16 or in_features % 32:
        return False
    if "amx_linear" not in _state:
        _state["amx_linear"] = _try_amx_linear()
    return _state["amx_linear"]


def amx_tiles(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] weight rearranged as the AMX linear reads it: [out / 16, in / 32] tiles of
    16 k-pairs x 16 outputs x 2, i.e. [out / 16, in / 32, 16, 16, 2]."""
    out_features, in_features = weight.shape
    tiles = weight.view(out_features // 16, 16, in_features // 32, 16, 2)
    return tiles.permute(0, 2, 3, 1, 4).contiguous()


def fma_linear_fits(weight: torch.Tensor) -> bool:
    """Whether the AVX2 FMA linear can take this weight: bf16 [out, in] with out % 16 == 0, and
    the kernel built (a CPU with AVX2 and FMA)."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.shape[0] % 16:
        return False
    library = ops()
    return library is not None and hasattr(library, "fma_linear")


def fma_panels(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] weight rearranged as the FMA linear reads it: panels of 16 outputs,
    [out / 16, in, 16], lane 2j holding output j and lane 2j + 1 output 8 + j."""
    out_features, in_features = weight.shape
    halves = weight.view(out_features // 16, 2, 8, in_features)
    return halves.permute(0, 3, 2, 1).reshape(out_features // 16, in_features, 16).contiguous()


def _try_amx_linear() -> bool:
    library = ops()
    if library is None or not hasattr(library, "amx_linear"):  # built without AMX
        return False
    try:
        library.amx_linear(torch.zeros(1, 32, dtype=torch.bfloat16), torch.zeros(1, 1, 16, 16, 2, dtype=torch.bfloat16), None)
    except RuntimeError as exc:  # e.g. the OS refuses AMX state
        logger.warning("AMX linear unavailable: %s", exc)
        return False
    return True


def available_on(device: torch.device) -> bool:
    return device.type == "cpu" and ops() is not None


def library_path() -> Path:
    """Where this CPU's own build lives: $KESTREL_HOME/kernels/<key>/kestrel_cpu_ops.so."""
    from engine.assets import kestrel_home

    # -march=native code is only good for this CPU: the build is keyed by its feature flags too.
    return kestrel_home() / "kernels" / cache_key(FLAGS, _cpu_flags()) / f"{LIBRARY_NAME}.so"


def _load() -> KernelOps | None:
    """The prebuilt library that fits this CPU best, else this CPU's own build (built now if
    it is not cached yet). KESTREL_KERNELS=<variant> loads that prebuilt variant and nothing
    else; KESTREL_KERNELS=native skips the prebuilt ones."""
    choice = os.environ.get("KESTREL_KERNELS", "")
    forced = next((variant for variant in VARIANTS if variant.name == choice), None)
    if forced is not None:
        return _load_variant(forced)
    prebuilt, why_not = (None, "") if choice == "native" else choose_prebuilt(cpu_flags())
    if prebuilt is not None:
        try:
            torch.ops.load_library(str(prebuilt))
            logger.info("fused CPU kernels: prebuilt %s", prebuilt.name)
            return cast(KernelOps, torch.ops.kestrel)
        except Exception as exc:  # e.g. a library it needs is missing
            why_not = f"loading the prebuilt kernels {prebuilt} failed: {exc}"
    if why_not:
        logger.warning("%s; building them for this CPU instead", why_not)
    library = library_path()
    try:
        if library.exists():
            torch.ops.load_library(str(library))
        else:
            _build(library)
    except Exception as exc:  # no compiler, a failed build: fall back to eager torch
        logger.error("fused CPU kernels unavailable, using eager torch ops instead (slower): %s", exc)
        return None
    return cast(KernelOps, torch.ops.kestrel)


def _load_variant(variant: Variant) -> KernelOps | None:
    library = prebuilt_path(variant)
    missing = sorted(variant.cpu_flags - cpu_flags())
    try:
        if missing:  # its instructions would crash the process (SIGILL)
            raise RuntimeError(f"this CPU lacks {' '.join(missing)}")
        torch.ops.load_library(str(library))
    except Exception as exc:
        logger.error("fused CPU kernels unavailable, using eager torch ops instead (slower): "
                     "KESTREL_KERNELS=%s: %s", variant.name, exc)  # fmt: skip
        return None
    logger.info("fused CPU kernels: prebuilt %s", library.name)
    return cast(KernelOps, torch.ops.kestrel)


def _cpu_flags() -> bytes:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return b""
    return next((line.encode() for line in lines if line.startswith("flags")), b"")


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as /proc/cpuinfo names them (empty where there is none)."""
    return frozenset(_cpu_flags().decode().partition(":")[2].split())


def _build(library: Path) -> None:
    """Compile the library for this CPU into `library` for later processes, and load it."""
    library.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_scratch(library.parent)
    logger.info("compiling fused CPU kernels into %s (once, about 20 s)", library.parent)
    build(library, FLAGS)
    torch.ops.load_library(str(library))


# A build takes about 20 s: a scratch directory this old belongs to a build that was killed.
DEAD_SCRATCH_AGE_S = 3600


def _remove_dead_scratch(directory: Path) -> None:
    now = time.time()
    for scratch in directory.glob("build-*"):
        try:
            if now - scratch.stat().st_mtime > DEAD_SCRATCH_AGE_S:
                shutil.rmtree(scratch, ignore_errors=True)
        except OSError:  # another process removed it first
            pass
