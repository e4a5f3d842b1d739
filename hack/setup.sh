#!/usr/bin/env bash
# Installs everything tierwise needs on a fresh Debian machine, and nothing twice:
#   - Debian packages: Prometheus, Redis, PostgreSQL (test fixtures start them on loopback)
#   - Go >= 1.26 (from Debian plus the Go module proxy's toolchain when Debian's is older)
#   - a Python virtual environment in .venv with tierwise installed editable, with dev tools
#   - the Kubernetes control plane binaries, kubectl, kwok and helm, built from Go modules
# Says clearly what it could not install, and fails then.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*" >&2; }
missing=()

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    say "cannot install Debian packages $* without root: install them, then run this again"
    missing+=("$@"); return 0
  fi
  say "installing Debian packages: $*"
  if [ ! -f /tmp/.tierwise-apt-updated ]; then apt-get update -qq && touch /tmp/.tierwise-apt-updated; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

need_pkgs=()
command -v prometheus >/dev/null || need_pkgs+=(prometheus)
command -v redis-server >/dev/null || need_pkgs+=(redis-server)
if ! command -v pg_ctl >/dev/null && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then need_pkgs+=(postgresql); fi
command -v git >/dev/null || need_pkgs+=(git)
# libfaketime: a test runs the operator across a budget period's end without waiting for it.
command -v faketime >/dev/null || need_pkgs+=(faketime)
if ! command -v go >/dev/null; then need_pkgs+=(golang-go); fi
[ ${#need_pkgs[@]} -eq 0 ] || apt_install "${need_pkgs[@]}"

# Kubernetes 1.36 needs Go 1.26; an older go fetches that toolchain from the Go module proxy.
if command -v go >/dev/null; then
  gover=$(go env GOVERSION | sed 's/^go//')
  if [ "$(printf '%s\n1.26\n' "$gover" | sort -V | head -n1)" != "1.26" ]; then
    say "Go $gover is older than 1.26; using the go1.26.8 toolchain from the Go module proxy"
    export GOTOOLCHAIN=go1.26.8
  fi
else
  missing+=(go)
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  say "Python >= 3.11 is required ($python is $("$python" --version 2>&1))"; exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv || { apt_install python3-venv; "$python" -m venv .venv; }
fi
stamp=.venv/.tierwise-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing Python dependencies into .venv"
  log=.venv/pip-install.log
  if ! { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e '.[dev]'; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2; say "pip install failed (full log: $log)"; exit 1
  fi
  touch "$stamp"
fi

if [ ${#missing[@]} -gt 0 ]; then
  say "could not install: ${missing[*]}"; exit 1
fi

# PYTHON_ONLY=1: stop here (the standalone gateway and the replay need nothing more); the demo
# shows its first result before the Kubernetes build.
if [ "${PYTHON_ONLY:-0}" = 1 ]; then say "ready (Python only)"; exit 0; fi
if [ -z "${KUBEBUILDER_ASSETS:-}${TIERWISE_BIN_DIR:-}${TIERWISE_KUBECONFIG:-}" ]; then
  bash hack/build-tools.sh >/dev/null
fi
say "ready"
