#!/usr/bin/env bash
# Build llama.cpp's llama-server from the llama.cpp that the llama-cpp-python sdist on PyPI vendors,
# and install it to $KESTREL_HOME/peers/llama.cpp/<version>/llama-server (the `--peer llama.cpp`
# of benchmarks/serve.py). Idempotent: does nothing if that binary exists and was built for this
# CPU. About 20 minutes on 2 cores; run it in the background:
#
#   nohup benchmarks/build_llama_server.sh > /tmp/llama-build.log 2>&1 &
#
# Environment: KESTREL_HOME (default ~/.cache/kestrel), LLAMA_CPP_PYTHON_VERSION (default below,
# the newest on PyPI that was checked to build), JOBS (default: number of cores), PYTHON (the
# interpreter whose pip downloads the sdist), KEEP_BUILD=1 to keep the build tree, and
# LLAMA_ISA=x86-64-v3 for a build with AVX2 + FMA only whatever this CPU has, installed to
# <version>-x86-64-v3/ (pass it to serve.py as KESTREL_LLAMA_SERVER): the AVX2 peer measured on
# an AVX-512 host, beside Kestrel's own x86-64-v3 kernels (KESTREL_KERNELS=x86-64-v3).
#
# NOTE: GGML_NATIVE=ON compiles for this CPU (-march=native). The CPU kind of these machines
# changes between sessions (AVX2 EPYC / AVX-512 + AMX Sapphire Rapids), so the install directory
# records the CPU it was built on in BUILD_INFO, and a mismatch means a rebuild.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
KESTREL_HOME="${KESTREL_HOME:-$HOME/.cache/kestrel}"
JOBS="${JOBS:-$(nproc)}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

ISA="${LLAMA_ISA:-native}"
case "$ISA" in
    native) PREFIX="$KESTREL_HOME/peers/llama.cpp/$VERSION" ;;
    x86-64-v3) PREFIX="$KESTREL_HOME/peers/llama.cpp/$VERSION-$ISA" ;;
    *) echo "LLAMA_ISA must be native or x86-64-v3, not $ISA" >&2; exit 2 ;;
esac
BINARY="$PREFIX/llama-server"
INFO="$PREFIX/BUILD_INFO"
WORK="$KESTREL_HOME/peers/llama.cpp/.build-$VERSION-$ISA"

# The CPU a native build is for: model name and the ISA extensions that change ggml's kernels.
cpu_signature() {
    local model flags
    model="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    flags="$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' \
        | grep -E '^(avx|avx2|fma|f16c|avx512[a-z_0-9]*|amx[a-z_0-9]*|avx_vnni)$' | sort | tr '\n' ' ')"
    echo "$model | $flags"
}
CPU="$(cpu_signature)"
[[ "$ISA" == native ]] || CPU="any x86-64 | $ISA"

# A binary built for this CPU with a build flag of this script's (NO_AMX) that differs is rebuilt.
CPU_NEEDS_NO_AMX=0
[[ "$ISA" == native ]] && grep -qw amx_int8 /proc/cpuinfo && CPU_NEEDS_NO_AMX=1
if [[ -x "$BINARY" && -f "$INFO" ]] && grep -qxF "cpu: $CPU" "$INFO" \
    && { ((CPU_NEEDS_NO_AMX == 0)) || grep -q -- "-mno-amx-int8" "$INFO"; }; then
    echo "already built: $BINARY"
    "$BINARY" --version 2>&1 | head -n 2 || true
    exit 0
fi
if [[ -x "$BINARY" ]]; then
    echo "$BINARY was built for another CPU or with other flags; rebuilding for: $CPU"
fi

missing=()
command -v cmake > /dev/null || missing+=(cmake)
command -v g++ > /dev/null || missing+=(build-essential)
if ((${#missing[@]})); then
    echo "installing ${missing[*]}"
    sudo_cmd=()
    [[ "$(id -u)" == 0 ]] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y "${missing[@]}"
fi

mkdir -p "$WORK"
SDIST="$WORK/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    # pip prepares the sdist's metadata (a minute or two: it installs scikit-build-core).
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$WORK"
fi
SRC="$WORK/llama_cpp_python-$VERSION"
[[ -d "$SRC" ]] || tar -xzf "$SDIST" -C "$WORK"
LLAMA="$SRC/vendor/llama.cpp"
# The sdist has no .git: take the vendored commit from the changelog's entry for this version.
COMMIT="$(awk -v v="## [$VERSION]" '$0 == v {on = 1; next} /^## \[/ {on = 0}
    on && match($0, /llama\.cpp@[0-9a-f]+/) {print substr($0, RSTART + 10, RLENGTH - 10); exit}' \
    "$SRC/CHANGELOG.md")"
COMMIT="${COMMIT:-unknown}"

# Static (one self-contained binary), native, server only. No network at build time: no
# prebuilt web UI download from Hugging Face, no npm, no OpenSSL (loopback HTTP only).
CMAKE_FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_COMMIT="$COMMIT"
)
if [[ "$ISA" == native ]]; then
    CMAKE_FLAGS+=(-DGGML_NATIVE=ON)
else  # x86-64-v3
    CMAKE_FLAGS+=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
                  -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_INT8=OFF)
fi
# ggml's AMX backend segfaults in ggml_backend_amx_mul_mat on the first inference on these Sapphire
# Rapids machines (Q4_1 and Q4_K_M files alike; upstream ggml-org/llama.cpp#20824, closed without
# a fix). Build without it: ggml then runs its AVX-512 (VNNI, BF16) kernels and repacking there.
# GCC's explicit -mno-* flags win over what -march=native implies, whatever their order.
if ((CPU_NEEDS_NO_AMX)); then
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CMAKE_FLAGS+=("-DCMAKE_C_FLAGS=$NO_AMX" "-DCMAKE_CXX_FLAGS=$NO_AMX")
fi
# LLAMA_CURL is deprecated (a warning) in this llama.cpp but still an option in older ones.
grep -q 'LLAMA_CURL' "$LLAMA/CMakeLists.txt" && CMAKE_FLAGS+=(-DLLAMA_CURL=OFF)

start=$(date +%s)
echo "building llama-server: llama-cpp-python $VERSION, llama.cpp $COMMIT, $JOBS jobs"
cmake -S "$LLAMA" -B "$WORK/build" "${CMAKE_FLAGS[@]}"
cmake --build "$WORK/build" --target llama-server -j "$JOBS"
elapsed=$(($(date +%s) - start))

mkdir -p "$PREFIX"
install -m 0755 "$WORK/build/bin/llama-server" "$BINARY.tmp"
mv "$BINARY.tmp" "$BINARY"
{
    echo "llama-cpp-python: $VERSION"
    echo "llama.cpp commit: $COMMIT"
    echo "cmake flags: ${CMAKE_FLAGS[*]}"
    echo "compiler: $(g++ --version | head -n 1)"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) in ${elapsed} s with $JOBS jobs"
    echo "cpu: $CPU"
} > "$INFO"
[[ "${KEEP_BUILD:-0}" == 1 ]] || rm -rf "$WORK"
echo "installed $BINARY (build took ${elapsed} s)"
cat "$INFO"
