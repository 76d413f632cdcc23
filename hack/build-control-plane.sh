#!/usr/bin/env bash
# Build (once) and cache a Kubernetes control plane for the integration tests:
# etcd, kube-apiserver, kube-controller-manager and kube-scheduler in one directory,
# laid out like an envtest KUBEBUILDER_ASSETS directory.
#
# Source: Debian bookworm's `kubernetes` source package (upstream v1.20.2 with vendor/),
# built with Debian's Go. No container engine and no internet beyond Debian's mirror are
# needed. Prints the directory on stdout when done. Re-running with a complete cache is a
# no-op that takes milliseconds.
#
# Usage: hack/build-control-plane.sh [CACHE_DIR]
set -euo pipefail

VERSION=v1.20.2
CACHE=${1:-${GRAFT_K8S_CACHE:-$HOME/.cache/graft/k8s-$VERSION}}
BINS="kube-apiserver kube-controller-manager kube-scheduler"

complete() {
  for b in etcd $BINS; do [ -x "$CACHE/$b" ] || return 1; done
}
if complete; then echo "$CACHE"; exit 0; fi

log() { echo "[build-control-plane] $*" >&2; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

if ! command -v go >/dev/null || ! command -v etcd >/dev/null \
   || [ ! -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] \
   || [ ! -d /usr/share/gocode/src/github.com/json-iterator/go ]; then
  log "installing Go, etcd and two Go sources from Debian"
  $SUDO apt-get update -qq >&2
  $SUDO apt-get install -y -qq --no-install-recommends golang-go rsync etcd-server openssl \
      golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev dpkg-dev >&2
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/graft-k8s-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

if ! apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Package: kubernetes'; then
  log "adding a deb-src entry that mirrors the machine's Debian sources"
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
      | $SUDO tee /etc/apt/sources.list.d/graft-debian-src.sources >/dev/null
  else
    grep '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' \
      | $SUDO tee /etc/apt/sources.list.d/graft-debian-src.list >/dev/null
  fi
  $SUDO apt-get update -qq >&2
fi

log "fetching the kubernetes source package"
apt-get source --download-only kubernetes >&2
tar xzf kubernetes_*.orig.tar.gz
cd kubernetes-1.20.2

# The vendored reflect2 1.0.1 / json-iterator 1.1.10 crash under Go >= 1.18 on the first
# custom-object create; Debian ships the fixed releases (1.0.2 / 1.1.12) as Go sources.
rm -rf vendor/github.com/modern-go/reflect2 vendor/github.com/json-iterator/go
mkdir -p vendor/github.com/modern-go/reflect2 vendor/github.com/json-iterator/go
cp -L /usr/share/gocode/src/github.com/modern-go/reflect2/*.go \
      /usr/share/gocode/src/github.com/modern-go/reflect2/*.s vendor/github.com/modern-go/reflect2/
find /usr/share/gocode/src/github.com/json-iterator/go -maxdepth 1 -name '*.go' ! -name '*_test.go' \
  -exec cp -L {} vendor/github.com/json-iterator/go/ \;
rm -f vendor/github.com/modern-go/reflect2/*_test.go

export CGO_ENABLED=0 HOME="$WORK/home" GOFLAGS=-mod=vendor GOLDFLAGS="-s -w" \
  KUBE_GIT_VERSION=$VERSION KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20 KUBE_GIT_TREE_STATE=clean \
  KUBE_GIT_COMMIT=faecb196815e248d3ecfb03c680a4507229c2a56
mkdir -p "$HOME"
log "building $BINS (about 5 minutes on 2 cores)"
make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" >&2

mkdir -p "$CACHE.tmp"
for b in $BINS; do cp "_output/bin/$b" "$CACHE.tmp/"; done
cp "$(command -v etcd)" "$CACHE.tmp/etcd"
rm -rf "$CACHE"; mv "$CACHE.tmp" "$CACHE"
log "cached in $CACHE"
echo "$CACHE"
