"""Which prebuilt kernel library a CPU loads (engine.kernels.build.choose_prebuilt), and that a
variant's compiler flags use no instruction its CPU flags do not promise."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

import pytest

from engine.kernels.build import VARIANTS, choose_prebuilt, prebuilt_path

# /proc/cpuinfo flags of the two CPUs the sessions run on: AMD EPYC Zen 3 (a cloud VM) and
# Intel Sapphire Rapids.
ZEN3_CPUINFO = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
    "syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid "
    "tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c "
    "rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext "
    "invpcid_single ssbd ibrs ibpb stibp vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdseed "
    "adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 clzero xsaveerptr arat npt nrip_save umip vaes "
    "vpclmulqdq rdpid fsrm"
)
SAPPHIRE_RAPIDS_CPUINFO = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht "
    "syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni "
    "pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor "
    "lahf_lm abm 3dnowprefetch invpcid_single ssbd ibrs ibpb stibp ibrs_enhanced fsgsbase tsc_adjust bmi1 hle "
    "avx2 smep bmi2 erms invpcid rtm avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd "
    "sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 arat avx512vbmi umip pku "
    "ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq la57 rdpid "
    "cldemote movdiri movdir64b fsrm md_clear serialize tsxldtrk amx_bf16 avx512_fp16 amx_tile amx_int8 "
    "arch_capabilities"
)
ZEN3, SAPPHIRE_RAPIDS = frozenset(ZEN3_CPUINFO.split()), frozenset(SAPPHIRE_RAPIDS_CPUINFO.split())
# AMD Zen 4 (AVX-512 with BF16, no AMX) and Intel Cascade Lake (AVX-512 without BF16).
ZEN4 = ZEN3 | {"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx512ifma"}
CASCADE_LAKE = (SAPPHIRE_RAPIDS - {"avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx512_fp16"})
# A CPU from before AVX2 (Intel Ivy Bridge).
IVY_BRIDGE = ZEN3 - {"avx2", "bmi1", "bmi2", "fma", "movbe", "abm"}


@pytest.fixture
def every_variant(tmp_path):
    for variant in VARIANTS:
        prebuilt_path(variant, tmp_path).touch()
    return tmp_path


@pytest.mark.parametrize(
    ("cpu", "variant"),
    [(SAPPHIRE_RAPIDS, "amx"), (ZEN4, "avx512-bf16"), (CASCADE_LAKE, "x86-64-v4"), (ZEN3, "x86-64-v3")],
    ids=["sapphire-rapids", "zen4", "cascade-lake", "zen3"],
)
def test_each_cpu_gets_the_best_variant_it_runs(every_variant, cpu, variant):
    path, why_not = choose_prebuilt(cpu, every_variant)
    assert path == prebuilt_path(next(v for v in VARIANTS if v.name == variant), every_variant)
    assert why_not == ""


def test_a_missing_variant_falls_to_the_next_one_the_cpu_runs(tmp_path):
    prebuilt_path(VARIANTS[-1], tmp_path).touch()  # only x86-64-v3
    assert choose_prebuilt(SAPPHIRE_RAPIDS, tmp_path) == (prebuilt_path(VARIANTS[-1], tmp_path), "")


def test_no_prebuilt_directory_means_a_native_build_without_a_word(tmp_path):
    assert choose_prebuilt(SAPPHIRE_RAPIDS, tmp_path / "absent") == (None, "")
    assert choose_prebuilt(ZEN3, tmp_path) == (None, "")


def test_a_cpu_below_every_variant_builds_natively_and_says_why(every_variant):
    path, why_not = choose_prebuilt(IVY_BRIDGE, every_variant)
    assert path is None
    assert "lacks abm avx2 bmi1 bmi2 fma movbe" in why_not


def test_libraries_of_other_sources_or_another_torch_are_not_loaded(tmp_path):
    for variant in VARIANTS:
        stale = prebuilt_path(variant, tmp_path)
        stale.with_name(stale.name.replace(stale.stem.rsplit("-", 1)[1], "0123456789abcdef")).touch()
    path, why_not = choose_prebuilt(ZEN3, tmp_path)
    assert path is None
    assert "built from other sources or for another torch" in why_not


# What gcc defines for an instruction-set extension it may use -> the /proc/cpuinfo flag of it.
MACRO_CPU_FLAGS = {
    "__SSE3__": "pni", "__SSSE3__": "ssse3", "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2",
    "__CRC32__": "sse4_2", "__POPCNT__": "popcnt", "__GCC_HAVE_SYNC_COMPARE_AND_SWAP_16": "cx16",
    "__LAHF_SAHF__": "lahf_lm", "__AVX__": "avx", "__AVX2__": "avx2", "__BMI__": "bmi1",
    "__BMI2__": "bmi2", "__F16C__": "f16c", "__FMA__": "fma", "__LZCNT__": "abm", "__MOVBE__": "movbe",
    "__XSAVE__": "xsave", "__AVX512F__": "avx512f", "__AVX512BW__": "avx512bw", "__AVX512CD__": "avx512cd",
    "__AVX512DQ__": "avx512dq", "__AVX512VL__": "avx512vl", "__AVX512BF16__": "avx512_bf16",
    "__AVX512VNNI__": "avx512_vnni", "__AMX_TILE__": "amx_tile", "__AMX_BF16__": "amx_bf16",
}  # fmt: skip
NOT_EXTENSIONS = ("__FP_FAST_FMA",)  # says that fma() is fast (FMA is in the list)


def predefined_macros(compiler: str, flags: list[str]) -> set[str]:
    command = [compiler, *flags, "-dM", "-E", "-x", "c++", os.devnull]
    lines = subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()
    return {line.split()[1] for line in lines}  # "#define NAME VALUE"


@pytest.mark.parametrize("variant", VARIANTS, ids=[variant.name for variant in VARIANTS])
def test_a_variant_uses_only_instructions_its_cpu_flags_promise(variant):
    """Else a CPU chosen by its flags could meet an instruction it lacks (SIGILL)."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None or platform.machine() != "x86_64":
        pytest.skip("no C++ compiler (c++ or $CXX) on PATH, or not one for x86-64")
    added = predefined_macros(compiler, list(variant.march)) - predefined_macros(compiler, ["-march=x86-64"])
    extensions = {macro for macro in added if not macro.startswith(NOT_EXTENSIONS)}
    assert extensions <= MACRO_CPU_FLAGS.keys(), f"map these to cpuinfo flags: {extensions - MACRO_CPU_FLAGS.keys()}"
    assert {MACRO_CPU_FLAGS[macro] for macro in extensions} == variant.cpu_flags
