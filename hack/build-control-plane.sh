#!/usr/bin/env bash
# Build (once) and cache the control plane the integration tests run: etcd, kube-apiserver,
# kube-controller-manager and kube-scheduler v1.20.2 (hack/build-k8s.sh has the details).
# Prints the directory; a complete cache makes this a no-op that takes milliseconds.
#
# Usage: hack/build-control-plane.sh [CACHE_DIR]   (default ~/.cache/graft/k8s-v1.20.2)
set -euo pipefail
if [ $# -gt 0 ]; then export GRAFT_K8S_CACHE=$1; fi
exec bash "$(dirname "$0")/build-k8s.sh" control-plane
