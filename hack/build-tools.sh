#!/usr/bin/env bash
# Builds the Kubernetes control-plane binaries, kubectl, etcd, kwok and helm from their Go modules
# at pinned versions into a cache outside the repository. Re-running with everything cached is a
# no-op, so the test entry point can call it unconditionally.
#
#   hack/build-tools.sh            build what is missing, print the bin folder
#   TIERWISE_TOOLS_DIR=/x ...      cache somewhere else (default ~/.cache/tierwise/tools)
#
# Why wrapper modules: k8s.io/kubernetes replaces its k8s.io/* staging modules with local paths,
# which `go install pkg@version` refuses; a module that requires it must replace each staging
# module with the published v0.X.Y that matches v1.X.Y.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.36.3}"
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
# etcd comes from the version k8s.io/kubernetes itself requires, so it shares that module graph.

# Bump when the way the binaries are built changes, so no stale binary is reused.
BUILD_REV=2

cache="${TIERWISE_TOOLS_DIR:-$HOME/.cache/tierwise/tools}"
bin="$cache/bin-k8s-${K8S_VERSION}-kwok-${KWOK_VERSION}-helm-${HELM_VERSION}-r${BUILD_REV}"
mkdir -p "$bin"

export GOTOOLCHAIN="${GOTOOLCHAIN:-local}" GOFLAGS="-buildvcs=false -trimpath" CGO_ENABLED=0
ldflags="-s -w"

log() { printf 'build-tools: %s\n' "$*" >&2; }
# A long compile says it is alive: the elapsed time every minute until the command ends.
progress() {
  local what=$1 pid s=0; shift
  "$@" & pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1; s=$((s + 1))
    if [ $((s % 60)) = 0 ]; then log "still compiling $what: $((s / 60)) min"; fi
  done
  wait "$pid"
}

# Runs go, dropping its per-module progress chatter but keeping its exit status.
quiet_go() { go "$@" 2>&1 | { grep -v '^go: \(downloading\|added\|upgraded\|finding\)' || true; } >&2; }

have_all() { for b in "$@"; do [ -x "$bin/$b" ] || return 1; done; }

build_kubernetes() {
  local wanted=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl)
  have_all "${wanted[@]}" && return 0
  command -v go >/dev/null || { log "Go toolchain not found; install Go >= 1.26"; exit 1; }
  local mod="$cache/src/kubernetes-$K8S_VERSION"
  mkdir -p "$mod"
  local minor="${K8S_VERSION#v1.}"
  if [ ! -f "$mod/.resolved" ]; then
    log "resolving k8s.io/kubernetes@$K8S_VERSION (first run downloads modules)"
    (cd "$mod" && rm -f go.mod go.sum && go mod init tierwise.dev/tools/kubernetes >/dev/null 2>&1)
    local gomod
    gomod=$(cd "$mod" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    # Every staging replace becomes the published module of the matching v0 version.
    grep -E '^\s*k8s\.io/[^ ]+ => \./staging/' "$gomod" | awk '{print $1}' | while read -r m; do
      printf 'replace %s => %s v0.%s\n' "$m" "$m" "$minor"
    done >> "$mod/go.mod"
    mkdir -p "$mod/cmd/etcd"
    cat > "$mod/cmd/etcd/main.go" <<'GO'
// etcd built from the server module version that kube-apiserver itself is tested against.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
    # `tool` directives keep the main packages required (nothing can import a main package).
    # tidy keeps the tools and adds etcd at the version kube-apiserver already selects.
    (cd "$mod" && quiet_go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" \
        "k8s.io/kubernetes/cmd/kube-controller-manager@$K8S_VERSION" \
        "k8s.io/kubernetes/cmd/kube-scheduler@$K8S_VERSION" \
        "k8s.io/kubernetes/cmd/kubectl@$K8S_VERSION" \
      && quiet_go mod tidy) && touch "$mod/.resolved"
  fi
  log "compiling kubernetes $K8S_VERSION binaries and etcd (several minutes on 2 cores)"
  progress "kubernetes" bash -c 'cd "$1" && shift && exec "$@"' _ "$mod" go build -ldflags "$ldflags -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION" \
      -o "$bin/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl ./cmd/etcd
}

build_simple() {  # name module-path package version binary
  local name=$1 module=$2 pkg=$3 version=$4 binary=$5
  have_all "$binary" && return 0
  local mod="$cache/src/$name-$version"
  mkdir -p "$mod"
  if [ ! -f "$mod/.resolved" ]; then
    log "resolving $module@$version"
    (cd "$mod" && rm -f go.mod go.sum && go mod init "tierwise.dev/tools/$name" >/dev/null 2>&1 \
       && quiet_go get -tool "$pkg@$version") && touch "$mod/.resolved"
  fi
  log "compiling $binary $version"
  progress "$binary" bash -c 'cd "$1" && shift && exec "$@"' _ "$mod" go build -ldflags "$ldflags $6" -o "$bin/$binary" "$pkg"
}

build_kubernetes
build_simple kwok sigs.k8s.io/kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION" kwok \
  "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
# Helm reports the Kubernetes version it was built against to `template` and `lint`; its own
# release build sets it, a plain go build leaves 1.20.
k8s_minor="${K8S_VERSION#v1.}"; k8s_minor="${k8s_minor%%.*}"
build_simple helm helm.sh/helm/v3 helm.sh/helm/v3/cmd/helm "$HELM_VERSION" helm \
  "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION
   -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$k8s_minor
   -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$k8s_minor"

echo "$bin"
