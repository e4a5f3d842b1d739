#!/usr/bin/env bash
# Creates the LiteLLM venv the proxy benchmark uses (kept out of the project's .venv so LiteLLM's
# large dependency tree never mixes with tierwise's).
#
#   bench/setup_litellm.sh            # install (no-op when the pinned version is already there)
#   LITELLM_VERSION=1.x.y bench/setup_litellm.sh
#
# Needs network access to PyPI once; the benchmark itself runs LiteLLM fully offline.
set -euo pipefail

# 1.102.4 is the newest release that resolved on PyPI when this was written: the 1.103-1.109
# releases tried all require certifi>=2026.10.19, which PyPI did not have yet.
DEFAULT_VERSION=1.102.4
LITELLM_VERSION="${LITELLM_VERSION:-$DEFAULT_VERSION}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${TIERWISE_LITELLM_VENV:-$HOME/.cache/tierwise/bench-litellm-venv}"
PYTHON="${PYTHON:-python3}"

if [[ -x "$VENV/bin/litellm" ]] && \
   [[ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))' 2>/dev/null)" == "$LITELLM_VERSION" ]]; then
  echo "litellm $LITELLM_VERSION already installed in $VENV"
  exit 0
fi

start=$(date +%s)
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# The constraints file pins every transitive dependency to what the recorded runs used; it only
# fits the default version, so it is skipped when LITELLM_VERSION is overridden.
CONSTRAINTS=()
if [[ "$LITELLM_VERSION" == "$DEFAULT_VERSION" && -f "$HERE/litellm-constraints.txt" ]]; then
  CONSTRAINTS=(-c "$HERE/litellm-constraints.txt")
fi
"$VENV/bin/python" -m pip install --quiet "litellm[proxy]==$LITELLM_VERSION" "${CONSTRAINTS[@]}"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
print("installed litellm", m.version("litellm"), "fastapi", m.version("fastapi"), "uvicorn", m.version("uvicorn"))
PY
echo "setup took $(( $(date +%s) - start )) s; venv: $VENV"
