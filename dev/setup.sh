#!/usr/bin/env bash
# Set up .venv for development, tests and the demo: torch 2.14.1 + torchvision 0.29.1 (the dev/CI pins; the package
# itself pins neither, so GPU clusters keep their CUDA builds) and cdul-ray in editable mode with its test extras.
# Idempotent: re-runs only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.cdul-setup-$(cat pyproject.toml dev/setup.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
  .venv/bin/python -m pip install -q -e ".[test]"
  rm -f .venv/.cdul-setup-*
  touch "$stamp"
fi
