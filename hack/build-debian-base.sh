#!/usr/bin/env bash
# Build a Debian bookworm root filesystem image with debootstrap and `docker import` it.
#
# For machines that cannot pull python:3.11-slim or rayproject/ray (no registry reachable:
# air-gapped networks, these CI VMs). The root filesystem comes from the Debian mirror that
# apt on this machine already uses; images/base/Dockerfile then adds Python on top of it.
# The image's own /etc/apt/sources.list names the public Debian mirror, not this machine's:
# builds mount the machine's apt sources as a BuildKit secret (hack/build-settings.sh).
# Idempotent: an existing image with the tag is kept.
#
# Usage: hack/build-debian-base.sh [TAG]        (default graft-local/debian:bookworm)
# Env:   DOCKER (client), GRAFT_DEBIAN_MIRROR (default: the first Debian URI apt uses)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tag="${1:-graft-local/debian:bookworm}"
docker="${DOCKER:-$("$here/docker-client.sh")}"
log() { echo "[build-debian-base] $*" >&2; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

if "$docker" image inspect "$tag" >/dev/null 2>&1; then echo "$tag"; exit 0; fi

first_mirror() {
  # The first Debian repository apt uses: deb822 sources first, then one-line lists.
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit}' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] && awk '$1 == "deb" && $3 ~ /^bookworm$/ {print ($2 ~ /^\[/ ? $3 : $2); exit}' "$f"
  done
  echo http://deb.debian.org/debian
}
mirror="${GRAFT_DEBIAN_MIRROR:-$(first_mirror | sed -n 1p)}"
if ! command -v debootstrap >/dev/null; then
  log "installing debootstrap"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends debootstrap >&2
fi

root="$(mktemp -d "${TMPDIR:-/tmp}/graft-debian.XXXXXX")"
trap '$SUDO rm -rf "$root"' EXIT
log "debootstrap --variant=minbase bookworm from $mirror"
$SUDO debootstrap --variant=minbase bookworm "$root/rootfs" "$mirror" >&2
# Slim like Debian's own container images: no manuals, docs (but licences) or translations,
# now or from later apt installs.
cat <<'DPKG' | $SUDO tee "$root/rootfs/etc/dpkg/dpkg.cfg.d/graft-slim" >/dev/null
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
DPKG
$SUDO find "$root/rootfs/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
$SUDO find "$root/rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
$SUDO rm -rf "$root/rootfs/usr/share/man/"* "$root/rootfs/usr/share/info/"* \
  "$root/rootfs/usr/share/locale/"* "$root/rootfs/usr/share/lintian/"*
# Nothing of this machine stays in the image: public sources, no apt lists, no logs.
echo "deb http://deb.debian.org/debian bookworm main" | $SUDO tee "$root/rootfs/etc/apt/sources.list" >/dev/null
$SUDO rm -rf "$root/rootfs/var/lib/apt/lists/"* "$root/rootfs/var/cache/apt/"*.bin \
  "$root/rootfs/var/cache/apt/archives/"*.deb "$root/rootfs/var/log/"* "$root/rootfs/debootstrap"
$SUDO tar -C "$root/rootfs" --numeric-owner -c . \
  | "$docker" import --change 'CMD ["bash"]' \
      --message "debootstrap --variant=minbase bookworm" - "$tag" >&2
log "imported $tag"
echo "$tag"
