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
here="$(cd "$(dirname "$0")" && pwd)"
CACHE=${1:-${GRAFT_K8S_CACHE:-$HOME/.cache/graft/k8s-$VERSION}}
BINS="kube-apiserver kube-controller-manager kube-scheduler"

complete() {
  for b in etcd $BINS; do [ -x "$CACHE/$b" ] || return 1; done
}
if complete; then echo "$CACHE"; exit 0; fi

log() { echo "[build-control-plane] $*" >&2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/graft-k8s-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
# shellcheck source=hack/lib/k8s-source.sh
. "$here/lib/k8s-source.sh"
k8s_prepare_source build-control-plane etcd-server openssl
log "building $BINS (about 5 minutes on 2 cores)"
make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" >&2

mkdir -p "$CACHE.tmp"
for b in $BINS; do cp "_output/bin/$b" "$CACHE.tmp/"; done
cp "$(command -v etcd)" "$CACHE.tmp/etcd"
rm -rf "$CACHE"; mv "$CACHE.tmp" "$CACHE"
log "cached in $CACHE"
echo "$CACHE"
