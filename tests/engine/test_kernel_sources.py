"""Every kernel source compiles for every instruction-set path, whatever this host's CPU.

The library is built with -march=native, so a host compiles only its own paths: an AVX2-only
CPU never sees the AVX-512 and AMX code, an AVX-512 one never the AVX2-only code. Here every
engine/kernels/*.cpp goes through the compiler once per path, with the flags the build uses
(torch.utils.cpp_extension's includes, defines and language standard; engine.kernels.FLAGS)
but the path's -m flags for -march=native, and no code generated.

NOTE: one translation unit per path includes every source, so torch's headers are parsed once
per path, not once per source and path (4x the CPU time). The sources' file-local names
(anonymous namespaces) must therefore differ between files. Each file still compiles on its
own in the real build, for the host's path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.utils import cpp_extension

from engine import kernels

pytestmark = pytest.mark.slow  # about 10 s of compiler per path: 35 s on 2 idle cores

# Each path: flags that select it whatever the host, and the macros it defines of those that
# choose code (simd.h's KESTREL_*, and the compiler's that quant_blocks.h tests).
ISA_PATHS = {
    "scalar": (["-march=x86-64"], set()),  # the portable loops only
    "avx2": (  # AVX2 + FMA + F16C, as AMD Zen 3
        ["-march=x86-64", "-mavx2", "-mfma", "-mf16c"],
        {"KESTREL_AVX2", "KESTREL_AVX2_ONLY", "__F16C__"},
    ),
    "avx-vnni": (  # AVX2 with AVX-VNNI, as Intel Alder Lake: the interleaved linear's 256-bit vpdpbusd
        ["-march=x86-64-v3", "-mavxvnni"],
        {"KESTREL_AVX2", "KESTREL_AVX2_ONLY", "__F16C__", "__AVXVNNI__"},
    ),
    "avx512": (  # AVX-512 without BF16, as Intel Skylake-SP: AVX2-only paths beside quant's AVX-512 ones
        ["-march=skylake-avx512"],
        {"KESTREL_AVX2", "KESTREL_AVX2_ONLY", "__AVX512BW__", "__F16C__"},
    ),
    "avx512-bf16": (  # AVX-512 with BF16 and VNNI, as AMD Zen 4
        ["-march=x86-64-v4", "-mavx512bf16", "-mavx512vnni"],
        {"KESTREL_AVX2", "KESTREL_AVX512_BF16", "__AVX512BW__", "__F16C__"},
    ),
    "amx": (  # AVX-512 BF16 and AMX, as Intel Sapphire Rapids
        ["-march=sapphirerapids"],
        {"KESTREL_AVX2", "KESTREL_AVX512_BF16", "KESTREL_AMX", "__AVX512BW__", "__F16C__", "__AVXVNNI__"},
    ),
}
PATH_MACROS = {
    "KESTREL_AVX2", "KESTREL_AVX2_ONLY", "KESTREL_AVX512_BF16", "KESTREL_AMX", "__AVX512BW__", "__F16C__", "__AVXVNNI__",
}  # fmt: skip


def find_compiler() -> str:
    compiler = shutil.which(os.environ.get("CXX", "c++"))  # the compiler cpp_extension uses
    if compiler is None:
        pytest.skip("no C++ compiler (c++ or $CXX) on PATH")
    return compiler


def build_flags() -> list[str]:
    """What torch.utils.cpp_extension.load passes when it compiles the kernels (torch 2.13),
    besides engine.kernels.FLAGS."""
    includes = [*cpp_extension.include_paths("cpu"), sysconfig.get_path("include", scheme="posix_prefix")]
    return [
        "-DTORCH_EXTENSION_NAME=kestrel_cpu_ops",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *[flag for path in includes for flag in ("-isystem", path)],
        "-fPIC",
        "-std=c++20",
    ]


def front_end_only(compiler: str) -> list[str]:
    """Flags that run the compiler as far as it checks intrinsics against the instruction set,
    and no further.

    NOTE: not -fsyntax-only. gcc reports an intrinsic used outside its instruction set ("target
    specific option mismatch") when it inlines it, after the syntax checks: -fsyntax-only passes
    an AVX-512 intrinsic in AVX2 code. gcc's slim LTO objects stop right after that, for the
    time -fsyntax-only takes; clang checks while emitting its IR.
    """
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    if "clang" in version:
        return ["-O0", "-emit-llvm", "-c", "-o", os.devnull]
    return ["-O0", "-flto", "-fno-fat-lto-objects", "-c", "-o", os.devnull]


@pytest.mark.parametrize("isa", ISA_PATHS)
def test_the_flags_select_the_path(isa):
    """Else the check below could pass without compiling the code it is meant to."""
    flags, macros = ISA_PATHS[isa]
    command = [find_compiler(), *flags, "-std=c++20", "-dM", "-E", "-x", "c++", str(kernels.KERNEL_DIR / "simd.h")]
    lines = subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()
    assert {line.split()[1] for line in lines} & PATH_MACROS == macros  # lines: "#define NAME VALUE"


def test_every_kernel_source_compiles_for_every_instruction_set(tmp_path):
    compiler = find_compiler()
    every_source = tmp_path / "every_kernel.cpp"
    every_source.write_text("".join(f'#include "{source}"\n' for source in kernels.SOURCES))
    common = [*build_flags(), *[flag for flag in kernels.FLAGS if not flag.startswith(("-march", "-O"))]]
    common += front_end_only(compiler)

    def check(isa: str) -> str | None:
        flags = ISA_PATHS[isa][0]
        result = subprocess.run([compiler, *common, *flags, str(every_source)], capture_output=True, text=True)
        if result.returncode == 0:
            return None
        lines = result.stderr.splitlines()
        errors = [line for line in lines if ": error:" in line or "called from here" in line] or lines
        return f"{isa} ({' '.join(flags)}):\n  " + "\n  ".join(errors[:20])

    # One more compiler than cores: six paths on two cores finish with both busy to the end.
    with ThreadPoolExecutor(max_workers=min(len(ISA_PATHS), (os.cpu_count() or 1) + 1)) as pool:
        failures = [failure for failure in pool.map(check, ISA_PATHS) if failure]
    assert not failures, "\n".join(failures)
