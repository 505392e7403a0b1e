#!/usr/bin/env bash
# Build .venv-sglang: a real sglang 0.5.23 server that runs on a CPU-only machine (tests and CI use it).
# sglang pins torch 2.14.1 and transformers 5.19.0, which differ from the trainer's venv, hence a venv of its own.
# `--no-deps` because sglang's declared dependencies pull CUDA kernel packages (sglang-kernel, flashinfer, ...)
# that do not install or run without CUDA; the pure-Python needs are listed by name below.
# Usage: tools/sglang_cpu/build_venv.sh [VENV_DIR]   (idempotent: a finished venv is left as it is)
set -euo pipefail
VENV="${1:-.venv-sglang}"
PYTHON="${PYTHON:-python3}"
SGLANG_VERSION="${SGLANG_VERSION:-0.5.23}"
ROUTER_VERSION="${ROUTER_VERSION:-0.3.2}"
STAMP="$VENV/.installed-$SGLANG_VERSION"
if [[ -f "$STAMP" ]]; then
  echo "sglang venv ready: $VENV"; exit 0
fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
"${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1"
"${PIP[@]}" --no-deps "sglang==$SGLANG_VERSION"
"${PIP[@]}" aiohttp anthropic "blobfile==3.0.0" datasets distro easydict einops fastapi gguf interegular IPython \
  msgspec ninja numpy nvidia-ml-py "openai==2.8.0" "openai-harmony==0.0.4" orjson partial_json_parser pillow \
  prometheus-client pybase64 pydantic python-dateutil python-multipart pyzmq regex requests scipy \
  "sentencepiece==0.2.1" setproctitle soundfile tiktoken "tokenizers==0.23.2" tqdm "transformers==5.19.0" \
  uvicorn uvloop watchfiles xxhash zstandard triton llguidance "xgrammar==0.2.7" "outlines==0.1.11" \
  "compressed-tensors==0.18.0" torch_memory_saver psutil
"${PIP[@]}" "sglang-router==$ROUTER_VERSION"
touch "$STAMP"
echo "sglang venv ready: $VENV"
