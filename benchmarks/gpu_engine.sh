#!/usr/bin/env bash
# benchmarks.gpu_engine as one command on the GPU machine (../shared/gpu/README.md), run from the
# project root there with .gpu/ carried (made here by ../shared/gpu/prepare.sh):
#
#     DEADLINE_S=540 bash benchmarks/gpu_engine.sh
#
# Builds llama.cpp with CUDA (sm_90) and the tools the peers need while the 1.1B random model is
# written, quantizes it, then runs every stage under what is left of DEADLINE_S. Everything lands
# in $OUT: log.txt, gpu_engine.json (rewritten after each stage), each stage's log and
# faulthandler file. Draw it here with `python -m benchmarks.gpu_engine --plot <json>`.
set -uo pipefail
started=$(date +%s)
deadline=$((started + ${DEADLINE_S:-540}))
root=$PWD out=${OUT:-/tmp/gpu-out} models=/tmp/gpu-models build=/tmp/llama-cuda
mkdir -p "$out" "$models"
exec > >(tee -a "$out/log.txt") 2>&1
echo "== $(date -u +%T) $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader), $(nproc) cores"

site=/tmp/gpu-site
[ -d "$site" ] || python3 -m pip install -q --no-index --no-deps --target "$site" .gpu/wheels/*.whl
[ -d /tmp/llama-src/llama.cpp ] || { mkdir -p /tmp/llama-src && tar xzf .gpu/llama.cpp.tar.gz -C /tmp/llama-src; }
export PYTHONPATH="$root/.gpu:$site:/tmp/llama-src/llama.cpp/gguf-py:$root" PYTHONUNBUFFERED=1

f16=$models/gpu-llama-1.1b-F16.gguf q4=$models/gpu-llama-1.1b-Q4_K_M.gguf
if [ ! -f "$q4" ]; then  # the weights are written (~30 s) while llama.cpp builds
  python3 -c "from pathlib import Path
from benchmarks.gpu_engine import GPU_LLAMA
from deployments.demo_models.gguf_llama import write_f16
write_f16(GPU_LLAMA, Path('$f16'))" >"$out/model.log" 2>&1 &
  writer=$!
fi
if [ ! -f "$build/bin/libllama.so" ]; then
  cmake -S /tmp/llama-src/llama.cpp -B "$build" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF \
    -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF >"$out/cmake.log" 2>&1 ||
    { tail -20 "$out/cmake.log"; exit 1; }
  cmake --build "$build" -j"$(nproc)" --target llama llama-quantize llama-batched-bench llama-server \
    >"$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
  echo "== llama.cpp CUDA build done at +$(($(date +%s) - started))s"
fi
export LLAMA_CPP_LIB_PATH="$build/bin"
if [ ! -f "$q4" ]; then
  wait "$writer" || { cat "$out/model.log"; exit 1; }
  "$build/bin/llama-quantize" "$f16" "$q4" Q4_K_M "$(nproc)" >"$out/quantize.log" 2>&1 && rm -f "$f16"
  echo "== model ready at +$(($(date +%s) - started))s"
fi
python3 -m benchmarks.gpu_engine --model "$q4" --out "$out" --deadline-s $((deadline - $(date +%s) - 10))
echo "== done at +$(($(date +%s) - started))s"
