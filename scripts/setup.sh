#!/usr/bin/env bash
# Creates ./.venv (once) and installs slmlab into it, editable.
#   bash scripts/setup.sh              # training
#   bash scripts/setup.sh test         # + test dependencies
#   bash scripts/setup.sh cuda,wandb   # any extras of pyproject.toml
# torch is installed first and on its own: a bare `torch` requirement would pull a multi-GB CUDA
# build. Set TORCH_SPEC (e.g. "torch==2.13.0" or a CUDA wheel's index options) to choose another.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
$py -c "import torch" 2>/dev/null || $py -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
$py -m pip install -q -e ".${1:+[$1]}"
