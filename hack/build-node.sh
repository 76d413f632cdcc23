#!/usr/bin/env bash
# Build (once) and cache the node side of the real-kubelet tier (e2e/containers/): kubelet,
# kube-proxy and a static pause binary, v1.20.2 (hack/build-k8s.sh has the details and the
# kubelet's one patch). Prints the directory; a complete cache makes this a no-op.
#
# Usage: hack/build-node.sh [CACHE_DIR]     (default ~/.cache/graft/k8s-v1.20.2-node)
set -euo pipefail
if [ $# -gt 0 ]; then export GRAFT_K8S_NODE_CACHE=$1; fi
exec bash "$(dirname "$0")/build-k8s.sh" node
