#!/usr/bin/env bash
# Create the virtual environment ($VENV, default .venv) and install the plugin with its dev extras.
# FRESH_VENV=1 rebuilds it from scratch (CI does). Works offline: only the package registry is used.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ "${FRESH_VENV:-0}" = 1 ]; then rm -rf "$VENV"; fi
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# Pinned so that pip takes the CPU-capable build it already has, not a multi-GB download.
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install -q ".[dev]"
