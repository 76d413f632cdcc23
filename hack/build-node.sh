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

WORK=$(mktemp -d "${TMPDIR:-/tmp}/graft-k8s-node-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
# shellcheck source=hack/lib/k8s-source.sh
. "$here/lib/k8s-source.sh"
k8s_prepare_source build-node gcc libc6-dev patch
patch -p1 < "$here/kubelet-no-negative-oom-adj.patch" >&2
log "building kubelet and kube-proxy (about 5 minutes on 2 cores)"
make WHAT="cmd/kubelet cmd/kube-proxy" >&2

mkdir -p "$CACHE.tmp"
cp _output/bin/kubelet _output/bin/kube-proxy "$CACHE.tmp/"
gcc -Os -static -DVERSION=v1.20.2-graft -o "$CACHE.tmp/pause" build/pause/linux/pause.c
rm -rf "$CACHE"; mv "$CACHE.tmp" "$CACHE"
log "cached in $CACHE"
echo "$CACHE"
