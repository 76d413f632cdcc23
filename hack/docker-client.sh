#!/usr/bin/env bash
# Print the docker client that can run BuildKit builds (RUN --mount, --secret) here.
#
# Docker CLIs from 23 on hand BuildKit builds to the buildx plugin; without it they refuse
# DOCKER_BUILDKIT=1. Debian's docker.io client (20.10) still builds with BuildKit itself.
# So: the first `docker` with buildx, else one that is older than 23, else fail with a hint.
set -euo pipefail
candidates=()
command -v docker >/dev/null && candidates+=("$(command -v docker)")
for c in /usr/bin/docker /usr/local/bin/docker; do [ -x "$c" ] && candidates+=("$c"); done
for c in "${candidates[@]}"; do
  if "$c" buildx version >/dev/null 2>&1; then echo "$c"; exit 0; fi
done
for c in "${candidates[@]}"; do
  v="$("$c" --version 2>/dev/null | sed -n 's/^Docker version \([0-9]*\)\..*/\1/p')"
  if [ -n "$v" ] && [ "$v" -lt 23 ]; then echo "$c"; exit 0; fi
done
echo "no docker client that can build with BuildKit: install the buildx plugin or Debian's docker.io" >&2
exit 1
