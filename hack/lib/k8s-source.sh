# Sourced by hack/build-k8s.sh: fetch Debian bookworm's
# `kubernetes` source package (upstream v1.20.2 with vendor/) into the current directory,
# make its vendor tree build with Debian's Go, and export the build settings.
#
# k8s_prepare_source LOG_TAG EXTRA_APT_PACKAGES...
#   Installs Go and the two fixed Go sources (plus EXTRA_APT_PACKAGES) when any is missing,
#   adds a deb-src entry when none serves `kubernetes`, unpacks the source and cd's into it.
#   Expects $WORK (a scratch directory it may use as HOME) and $VERSION.

k8s_prepare_source() {
  local tag=$1; shift
  local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  local need=0 p
  command -v go >/dev/null || need=1
  for p in "$@"; do
    case $p in
      etcd-server) command -v etcd >/dev/null || need=1 ;;
      gcc) command -v gcc >/dev/null || need=1 ;;
    esac
  done
  [ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] || need=1
  [ -d /usr/share/gocode/src/github.com/json-iterator/go ] || need=1
  if [ $need = 1 ]; then
    echo "[$tag] installing Go and build tools from Debian" >&2
    $sudo apt-get update -qq >&2
    $sudo apt-get install -y -qq --no-install-recommends golang-go rsync dpkg-dev \
        golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev "$@" >&2
  fi

  if ! apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Package: kubernetes'; then
    echo "[$tag] adding a deb-src entry that mirrors the machine's Debian sources" >&2
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
      sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
        | $sudo tee /etc/apt/sources.list.d/graft-debian-src.sources >/dev/null
    else
      grep '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' \
        | $sudo tee /etc/apt/sources.list.d/graft-debian-src.list >/dev/null
    fi
    $sudo apt-get update -qq >&2
  fi

  echo "[$tag] fetching the kubernetes source package" >&2
  apt-get source --download-only kubernetes >&2
  tar xzf kubernetes_*.orig.tar.gz
  cd kubernetes-1.20.2

  # The vendored reflect2 1.0.1 / json-iterator 1.1.10 crash under Go >= 1.18 on the first
  # custom-object create; Debian ships the fixed releases (1.0.2 / 1.1.12) as Go sources.
  rm -rf vendor/github.com/modern-go/reflect2 vendor/github.com/json-iterator/go
  mkdir -p vendor/github.com/modern-go/reflect2 vendor/github.com/json-iterator/go
  cp -L /usr/share/gocode/src/github.com/modern-go/reflect2/*.go \
        /usr/share/gocode/src/github.com/modern-go/reflect2/*.s vendor/github.com/modern-go/reflect2/
  find /usr/share/gocode/src/github.com/json-iterator/go -maxdepth 1 -name '*.go' ! -name '*_test.go' \
    -exec cp -L {} vendor/github.com/json-iterator/go/ \;
  rm -f vendor/github.com/modern-go/reflect2/*_test.go

  export CGO_ENABLED=0 HOME="$WORK/home" GOFLAGS=-mod=vendor GOLDFLAGS="-s -w" \
    KUBE_GIT_VERSION=$VERSION KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20 KUBE_GIT_TREE_STATE=clean \
    KUBE_GIT_COMMIT=faecb196815e248d3ecfb03c680a4507229c2a56
  mkdir -p "$HOME"
}
