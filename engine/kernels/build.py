"""Compile the fused CPU kernels: for this CPU (-march=native, on first use) or ahead of time for
each level of the x86-64 instruction set (`python -m engine.kernels build`, as the Docker image
does), and choose the prebuilt library a CPU can run.

The compiler is called directly, with the flags torch.utils.cpp_extension would pass, so a
library can be built without loading it: a build host without AVX-512 can still build the
AVX-512 variants.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

KERNEL_DIR = Path(__file__).parent
LIBRARY_NAME = "kestrel_cpu_ops"
# One library from every .cpp here: cpu_ops.cpp holds the TORCH_LIBRARY and registers the ops of
# the kernel families it lists (row_ops.cpp, attention.cpp, ...); quant_ops.cpp adds its own with
# TORCH_LIBRARY_FRAGMENT. Headers (simd.h, ...) count for the build's cache key.
SOURCES = sorted(KERNEL_DIR.glob("*.cpp"))
# OpenMP so that at::parallel_for runs in parallel: the library links libgomp.so.1, which
# resolves to the copy torch has already loaded, so there is still one thread pool.
FLAGS = ["-O3", "-march=native", "-fopenmp"]
# Where `python -m engine.kernels build` puts the prebuilt libraries: beside the sources, so a
# volume mounted at $KESTREL_HOME (the cache of native builds and models) does not hide them.
PREBUILT_DIR = KERNEL_DIR / "prebuilt"

# /proc/cpuinfo flags of the x86-64 microarchitecture levels (as gcc's -march=x86-64-vN; Linux
# calls SSE3 "pni" and LZCNT "abm").
_X86_64_V2 = frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})
_X86_64_V3 = _X86_64_V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_X86_64_V4 = _X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
_BF16 = frozenset({"avx512_bf16", "avx512_vnni"})


@dataclass(frozen=True)
class Variant:
    """A prebuilt library: compiled with `march` in place of -march=native, it runs on CPUs
    whose /proc/cpuinfo flags include `cpu_flags`."""

    name: str
    march: tuple[str, ...]
    cpu_flags: frozenset[str]

    @property
    def flags(self) -> list[str]:
        return [flag for native in FLAGS for flag in (self.march if native == "-march=native" else (native,))]


# Best first; each selects one of the paths simd.h defines (test_kernel_sources.py's ISA_PATHS).
VARIANTS = (
    # Intel Sapphire Rapids and later: the AMX linear, sixteen-lane bf16 everywhere else.
    Variant(
        "amx",
        ("-march=x86-64-v4", "-mavx512bf16", "-mavx512vnni", "-mamx-tile", "-mamx-bf16"),
        _X86_64_V4 | _BF16 | {"amx_tile", "amx_bf16"},
    ),
    # AVX-512 with BF16 and VNNI: AMD Zen 4 and 5, Intel Cooper Lake.
    Variant("avx512-bf16", ("-march=x86-64-v4", "-mavx512bf16", "-mavx512vnni"), _X86_64_V4 | _BF16),
    # AVX-512 without BF16: Intel Skylake-SP to Ice Lake (eight-lane kernels, AVX-512 quant dots).
    Variant("x86-64-v4", ("-march=x86-64-v4",), _X86_64_V4),
    # AVX2 + FMA + F16C: AMD Zen 1-3, Intel Haswell and later.
    Variant("x86-64-v3", ("-march=x86-64-v3",), _X86_64_V3),
)


def cache_key(flags: Sequence[str], cpu_flags: bytes = b"") -> str:
    """What a library is good for: the sources, the flags, torch's version (its C++ ABI), and
    for a -march=native build the CPU's feature flags."""
    digest = hashlib.sha256(
        b"".join(path.read_bytes() for path in SOURCES + sorted(KERNEL_DIR.glob("*.h")))
        + " ".join(flags).encode() + torch.__version__.encode() + cpu_flags
    )
    return digest.hexdigest()[:16]


def prebuilt_path(variant: Variant, directory: Path = PREBUILT_DIR) -> Path:
    """Where the library of `variant` for these sources and this torch lives in `directory`."""
    return directory / f"{LIBRARY_NAME}-{variant.name}-{cache_key(variant.flags)}.so"


def choose_prebuilt(cpu_flags: Collection[str], directory: Path = PREBUILT_DIR) -> tuple[Path | None, str]:
    """The best prebuilt library in `directory` that a CPU with `cpu_flags` runs, or None and
    why none fits ("" when the directory holds no prebuilt library at all: build natively)."""
    present = sorted(path.name for path in directory.glob(f"{LIBRARY_NAME}-*.so"))
    if not present:
        return None, ""
    fitting = [variant for variant in VARIANTS if variant.cpu_flags <= set(cpu_flags)]
    for variant in fitting:
        path = prebuilt_path(variant, directory)
        if path.is_file():
            return path, ""
    if not fitting:
        missing = sorted(VARIANTS[-1].cpu_flags - set(cpu_flags))
        return None, f"this CPU lacks {' '.join(missing)} for the prebuilt kernels in {directory}"
    return None, (
        f"the prebuilt kernels in {directory} ({', '.join(present)}) were built from other sources "
        f"or for another torch than {torch.__version__}"
    )


def build(library: Path, flags: Sequence[str]) -> None:
    """Compile every source with `flags` and link them into `library`, without loading it.

    Each build runs in a scratch directory of its own beside `library`, renamed into place when
    done, so a build killed half way leaves nothing that looks finished and two processes
    building at once do not wait on each other.
    """
    build_many([(library, flags)])


def build_many(jobs: Sequence[tuple[Path, Sequence[str]]]) -> None:
    """`build` for several libraries, every compile of all of them sharing the cores."""
    compiler = os.environ.get("CXX", "c++")  # as torch.utils.cpp_extension
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler}; set $CXX) to build them with")
    scratches = []
    try:
        for library, _ in jobs:
            library.parent.mkdir(parents=True, exist_ok=True)
            scratches.append(Path(tempfile.mkdtemp(prefix="build-", dir=library.parent)))
        compiles = [
            (scratch / f"{source.stem}.o", [compiler, *_compile_flags(flags), "-c", str(source)])
            for scratch, (_, flags) in zip(scratches, jobs)
            for source in SOURCES
        ]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(lambda job: _run([*job[1], "-o", str(job[0])], f"compiling {job[1][-1]}"), compiles))
        for scratch, (library, _) in zip(scratches, jobs):
            objects = [str(scratch / f"{source.stem}.o") for source in SOURCES]
            _run([compiler, *objects, *_link_flags(), "-o", str(scratch / library.name)], f"linking {library.name}")
            os.replace(scratch / library.name, library)
    finally:
        for scratch in scratches:
            shutil.rmtree(scratch, ignore_errors=True)


def _compile_flags(flags: Sequence[str]) -> list[str]:
    """What torch.utils.cpp_extension.load passes to the compiler (torch 2.13), besides `flags`;
    the sources include no Python header."""
    torch_dir = Path(torch.__file__).parent
    includes = [torch_dir / "include", torch_dir / "include" / "torch" / "csrc" / "api" / "include"]
    return [
        f"-DTORCH_EXTENSION_NAME={LIBRARY_NAME}",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *[flag for path in includes for flag in ("-isystem", str(path))],
        "-fPIC",
        "-std=c++20",
        *flags,
    ]


def _link_flags() -> list[str]:
    torch_lib = Path(torch.__file__).parent / "lib"
    return ["-shared", "-fopenmp", f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch"]


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.splitlines()
        errors = [line for line in lines if ": error:" in line] or lines[-5:]
        raise RuntimeError(f"{what} failed ({command[0]} exited with {result.returncode}): " + " | ".join(errors[:5]))
