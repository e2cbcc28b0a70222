#!/usr/bin/env bash
# Creates (or updates) the virtual environment in .venv, installs memba_vision
# with its [dev] and [data] extras, and runs the CPU test suite. Extra arguments go to pytest.
#   bash tools/run_tests.sh            # whole suite
#   bash tools/run_tests.sh -k lim -x  # a subset
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup_env.sh
echo "[run_tests] running pytest"
exec "$VENV_PY" -m pytest tests "$@"
