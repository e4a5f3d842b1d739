#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set-up, static checks (ruff, mypy, import layers), CRD
# drift, then pytest (unit tests, and integration tests against a real local control plane). Extra
# arguments go to pytest, e.g. `bash hack/test.sh tests/unit -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check . && ruff format --check .
echo "== mypy"; mypy
echo "== layers"; lint-imports --no-cache
echo "== CRDs match the models"; python hack/gen_crds.py --check
echo "== pytest"; exec python -m pytest "$@"
