#!/usr/bin/env bash
# Install what the real-kubelet tier (e2e/containers) needs on the host, from Debian, where
# it is missing: dnsmasq (the cluster DNS the harness feeds from the API), iproute2 (the
# nodes' bridges), iptables (kube-proxy) and Docker (hack/start-docker.sh starts it).
# A no-op when all are present. Needs root (or sudo).
set -euo pipefail
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
need=()
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v ip >/dev/null || need+=(iproute2)
command -v iptables >/dev/null || need+=(iptables)
command -v dockerd >/dev/null || need+=(docker.io)
[ ${#need[@]} -gt 0 ] || exit 0
echo "[install-node-tools] installing ${need[*]} from Debian" >&2
$SUDO apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
