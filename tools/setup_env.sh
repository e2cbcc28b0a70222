#!/usr/bin/env bash
# Sourced by tools/run_tests.sh and tools/demo.sh: makes sure .venv exists and holds
# PyTorch (unpinned, from the package registry) and memba_vision (editable) with the
# dev and data extras (the tests read small tfds datasets with TensorFlow).
# Sets VENV_PY. Re-running is cheap: installs are skipped when nothing changed.
set -euo pipefail
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating the virtual environment in .venv"
  "$PYTHON" -m venv .venv
fi
VENV_PY="$PWD/.venv/bin/python"
stamp=.venv/.memba_vision_installed
fingerprint=$(cat setup.py | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$fingerprint" ] \
   || ! "$VENV_PY" -c 'import torch, torchvision, memba_vision, tensorflow_datasets' \
        >/dev/null 2>&1; then
  echo "[setup] installing PyTorch (first run: a large download, several minutes)"
  "$VENV_PY" -m pip install -q --disable-pip-version-check setuptools wheel
  "$VENV_PY" -m pip install -q --disable-pip-version-check torch torchvision
  echo "[setup] installing memba_vision[dev,data] (editable; data = tfds + TensorFlow)"
  "$VENV_PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e '.[dev,data]'
  echo "$fingerprint" > "$stamp"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
