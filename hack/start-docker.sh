#!/usr/bin/env bash
# Make sure a Docker daemon answers; install and start Debian's docker.io when none does.
#
# For CI machines and fresh VMs without systemd: Debian's docker.io (20.10) is installed with
# apt and dockerd is started in the background with overlay2 on the cgroupfs driver (these
# VMs run cgroup v1 without systemd). A daemon that already answers is left alone, whatever
# started it. Prints the docker client to use on stdout (see hack/docker-client.sh).
#
# Usage: hack/start-docker.sh          Env: GRAFT_DOCKERD_LOG (default /var/log/graft-dockerd.log)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
log() { echo "[start-docker] $*" >&2; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

if docker_bin="$("$here/docker-client.sh" 2>/dev/null)" && $SUDO "$docker_bin" info >/dev/null 2>&1; then
  echo "$docker_bin"; exit 0
fi

if ! command -v dockerd >/dev/null; then
  log "installing docker.io from Debian"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    docker.io iptables >&2
fi

logf="${GRAFT_DOCKERD_LOG:-/var/log/graft-dockerd.log}"
log "starting dockerd (log: $logf)"
# setsid: the daemon outlives the shell that started it (CI runs later steps in new shells).
$SUDO setsid dockerd --storage-driver=overlay2 --exec-opt native.cgroupdriver=cgroupfs \
  >"$logf" 2>&1 < /dev/null &
docker_bin="$("$here/docker-client.sh")"
for _ in $(seq 1 120); do
  if $SUDO "$docker_bin" info >/dev/null 2>&1; then echo "$docker_bin"; exit 0; fi
  sleep 0.5
done
log "dockerd did not answer within 60 s; last lines of $logf:"
tail -20 "$logf" >&2
exit 1
