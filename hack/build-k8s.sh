#!/usr/bin/env bash
# Build (once) and cache the Kubernetes v1.20.2 binaries the tests run, from Debian
# bookworm's `kubernetes` source package (upstream v1.20.2 with vendor/) and Debian's Go.
# No container engine and no internet beyond Debian's mirror are needed.
#
# Pieces (each cached in its own directory; a complete cache makes its piece a no-op):
#   control-plane  etcd, kube-apiserver, kube-controller-manager, kube-scheduler, laid out
#                  like an envtest KUBEBUILDER_ASSETS directory ($GRAFT_K8S_CACHE,
#                  default ~/.cache/graft/k8s-v1.20.2): the integration tests and e2e.
#   node           kubelet, kube-proxy and a static pause binary ($GRAFT_K8S_NODE_CACHE,
#                  default ~/.cache/graft/k8s-v1.20.2-node): the real-kubelet tier
#                  (e2e/containers/).
# The pieces that are missing are built together, from one unpacked source and one
# `make`: both at once take about a minute more than the control plane alone, where
# building them one after the other unpacks and compiles the shared packages twice.
#
# The node piece carries one patch (hack/kubelet-no-negative-oom-adj.patch): dockershim
# gives pod sandboxes oom_score_adj -998 (and Guaranteed pods -997), which needs
# CAP_SYS_RESOURCE; root in these VMs lacks it and every pod would fail in runc. The patch
# uses 0 for both. It touches only the kubelet.
#
# Prints each requested piece's cache directory, one per line, in the order asked.
# Usage: hack/build-k8s.sh PIECE...
set -euo pipefail

VERSION=v1.20.2
here="$(cd "$(dirname "$0")" && pwd)"
CP_CACHE=${GRAFT_K8S_CACHE:-$HOME/.cache/graft/k8s-$VERSION}
NODE_CACHE=${GRAFT_K8S_NODE_CACHE:-$HOME/.cache/graft/k8s-$VERSION-node}
CP_BINS="kube-apiserver kube-controller-manager kube-scheduler"
NODE_BINS="kubelet kube-proxy"

[ $# -gt 0 ] || { echo "usage: $0 control-plane|node ..." >&2; exit 2; }
complete() {
  case $1 in
    control-plane) for b in etcd $CP_BINS; do [ -x "$CP_CACHE/$b" ] || return 1; done ;;
    node) for b in $NODE_BINS pause; do [ -x "$NODE_CACHE/$b" ] || return 1; done ;;
    *) echo "unknown piece $1 (control-plane, node)" >&2; exit 2 ;;
  esac
}
cache_of() { if [ "$1" = node ]; then echo "$NODE_CACHE"; else echo "$CP_CACHE"; fi; }

missing=()
for piece in "$@"; do complete "$piece" || missing+=("$piece"); done
if [ ${#missing[@]} -gt 0 ]; then
  log() { echo "[build-k8s] $*" >&2; }
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/graft-k8s-build.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  cd "$WORK"
  what="" extra=()
  for piece in "${missing[@]}"; do
    case $piece in
      control-plane) what="$what cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler"
                     extra+=(etcd-server openssl) ;;
      node) what="$what cmd/kubelet cmd/kube-proxy"; extra+=(gcc libc6-dev patch) ;;
    esac
  done
  # shellcheck source=hack/lib/k8s-source.sh
  . "$here/lib/k8s-source.sh"
  k8s_prepare_source build-k8s "${extra[@]}"
  case " ${missing[*]} " in
    *" node "*) patch -p1 < "$here/kubelet-no-negative-oom-adj.patch" >&2 ;;
  esac
  log "building${what} (about 5 minutes on 2 cores, +1 for the node piece)"
  make WHAT="${what# }" >&2
  for piece in "${missing[@]}"; do
    cache=$(cache_of "$piece")
    rm -rf "$cache.tmp"; mkdir -p "$cache.tmp"
    if [ "$piece" = control-plane ]; then
      for b in $CP_BINS; do cp "_output/bin/$b" "$cache.tmp/"; done
      cp "$(command -v etcd)" "$cache.tmp/etcd"
    else
      for b in $NODE_BINS; do cp "_output/bin/$b" "$cache.tmp/"; done
      gcc -Os -static -DVERSION=$VERSION-graft -o "$cache.tmp/pause" build/pause/linux/pause.c
    fi
    rm -rf "$cache"; mv "$cache.tmp" "$cache"
    log "cached $piece in $cache"
  done
fi
for piece in "$@"; do cache_of "$piece"; done
