#!/usr/bin/env bash
# Build (once) and cache the node side of a Kubernetes v1.20.2 test cluster: kubelet,
# kube-proxy and a static pause binary, from the same Debian source package and Go as
# hack/build-control-plane.sh, for the real-kubelet e2e tier (e2e/containers/).
#
# One patch (hack/kubelet-no-negative-oom-adj.patch): dockershim gives pod sandboxes
# oom_score_adj -998 (and Guaranteed pods -997), which needs CAP_SYS_RESOURCE; root in
# these VMs lacks it and every pod would fail in runc. The patch uses 0 for both.
# Prints the cache directory; a complete cache makes this a no-op.
#
# Usage: hack/build-node.sh [CACHE_DIR]     (default ~/.cache/graft/k8s-v1.20.2-node)
set -euo pipefail

VERSION=v1.20.2
here="$(cd "$(dirname "$0")" && pwd)"
CACHE=${1:-${GRAFT_K8S_NODE_CACHE:-$HOME/.cache/graft/k8s-$VERSION-node}}
BINS="kubelet kube-proxy pause"

complete() {
  for b in $BINS; do [ -x "$CACHE/$b" ] || return 1; done
}
if complete; then echo "$CACHE"; exit 0; fi

log() { echo "[build-node] $*" >&2; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

if ! command -v go >/dev/null || ! command -v gcc >/dev/null \
   || [ ! -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] \
   || [ ! -d /usr/share/gocode/src/github.com/json-iterator/go ]; then
  log "installing Go, gcc and two Go sources from Debian"
  $SUDO apt-get update -qq >&2
  $SUDO apt-get install -y -qq --no-install-recommends golang-go rsync gcc libc6-dev patch \
      golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev dpkg-dev >&2
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/graft-k8s-node-build.XXXXXX")
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

# As in hack/build-control-plane.sh: the vendored reflect2/json-iterator crash under Go >= 1.18.
rm -rf vendor/github.com/modern-go/reflect2 vendor/github.com/json-iterator/go
mkdir -p vendor/github.com/modern-go/reflect2 vendor/github.com/json-iterator/go
cp -L /usr/share/gocode/src/github.com/modern-go/reflect2/*.go \
      /usr/share/gocode/src/github.com/modern-go/reflect2/*.s vendor/github.com/modern-go/reflect2/
find /usr/share/gocode/src/github.com/json-iterator/go -maxdepth 1 -name '*.go' ! -name '*_test.go' \
  -exec cp -L {} vendor/github.com/json-iterator/go/ \;
rm -f vendor/github.com/modern-go/reflect2/*_test.go
patch -p1 < "$here/kubelet-no-negative-oom-adj.patch" >&2

export CGO_ENABLED=0 HOME="$WORK/home" GOFLAGS=-mod=vendor GOLDFLAGS="-s -w" \
  KUBE_GIT_VERSION=$VERSION KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20 KUBE_GIT_TREE_STATE=clean \
  KUBE_GIT_COMMIT=faecb196815e248d3ecfb03c680a4507229c2a56
mkdir -p "$HOME"
log "building kubelet and kube-proxy (about 5 minutes on 2 cores)"
make WHAT="cmd/kubelet cmd/kube-proxy" >&2

mkdir -p "$CACHE.tmp"
cp _output/bin/kubelet _output/bin/kube-proxy "$CACHE.tmp/"
gcc -Os -static -DVERSION=v1.20.2-graft -o "$CACHE.tmp/pause" build/pause/linux/pause.c
rm -rf "$CACHE"; mv "$CACHE.tmp" "$CACHE"
log "cached in $CACHE"
echo "$CACHE"
