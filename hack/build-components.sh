#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd, kwok, helm and crane from their Go
# modules at the versions pinned in versions.env, into a per-version cache. A warm run is a no-op.
source "$(dirname "$0")/lib.sh"

build_kubernetes() {
  local want=(kube-apiserver kube-controller-manager kube-scheduler kubectl) missing=0 b
  for b in "${want[@]}"; do [ -x "$KUBE_BIN_DIR/$b" ] || missing=1; done
  [ "$missing" = 0 ] && return 0

  local minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
  local staging_version="v0.${KUBE_VERSION#v1.}"
  local work="$PF_CACHE/build/kubernetes-$KUBE_VERSION"
  mkdir -p "$work" "$KUBE_BIN_DIR"
  log "building Kubernetes $KUBE_VERSION components (cold build takes a while)"

  # The kubernetes go.mod requires its staging modules at v0.0.0 and replaces them with local
  # paths, which only work inside its own repository. Replace each with its tagged release.
  local gomod
  gomod=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
  [ -f "$gomod" ] || die "could not download k8s.io/kubernetes@$KUBE_VERSION"
  local goline godebug staging
  goline=$(grep -m1 '^go ' "$gomod")
  godebug=$(grep -m1 '^godebug ' "$gomod" || true)
  staging=$(grep -oE '^\s*k8s\.io/[a-z0-9-]+ v0\.0\.0\s*$' "$gomod" | awk '{print $1}' | sort -u)
  [ -n "$staging" ] || die "no staging modules found in $gomod"
  {
    echo "module local/kubernetes-build"
    echo
    echo "$goline"
    [ -n "$godebug" ] && echo "$godebug"
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    echo "replace ("
    for m in $staging; do echo "	$m => $m $staging_version"; done
    echo ")"
  } >"$work/go.mod"

  local ldflags="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  (
    cd "$work"
    for b in "${want[@]}"; do
      log "go build $b"
      CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "$ldflags" -o "$KUBE_BIN_DIR/$b.tmp" "k8s.io/kubernetes/cmd/$b"
      mv "$KUBE_BIN_DIR/$b.tmp" "$KUBE_BIN_DIR/$b"
    done
  )
}

build_etcd() {
  [ -x "$ETCD_BIN_DIR/etcd" ] && return 0
  local work="$PF_CACHE/build/etcd-$ETCD_VERSION"
  mkdir -p "$work" "$ETCD_BIN_DIR"
  log "building etcd $ETCD_VERSION"
  # etcd's own go.mod carries replace directives, so `go install` refuses it: build via a wrapper.
  printf 'module local/etcd-build\n\ngo 1.26\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" >"$work/go.mod"
  (cd "$work" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$ETCD_BIN_DIR/etcd.tmp" go.etcd.io/etcd/server/v3)
  mv "$ETCD_BIN_DIR/etcd.tmp" "$ETCD_BIN_DIR/etcd"
}

# go_install DIR PACKAGE@VERSION [LDFLAGS]: one Go command into DIR, unless it is already there.
go_install() {
  local dir=$1 package=$2 ldflags="-s -w ${3:-}" name=${2%@*}
  name=${name##*/}
  [ -x "$dir/$name" ] && return 0
  mkdir -p "$dir"
  log "building $name ${package##*@}"
  CGO_ENABLED=0 GOBIN="$dir" go install -trimpath -ldflags "$ldflags" "$package"
}

build_kwok() { go_install "$KWOK_BIN_DIR" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"; }
build_helm() {
  go_install "$HELM_BIN_DIR" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
}
build_crane() { go_install "$CRANE_BIN_DIR" "github.com/google/go-containerregistry/cmd/crane@$CRANE_VERSION"; }

build_etcd
build_kwok
build_crane
build_helm
build_kubernetes
log "components ready: $KUBE_BIN_DIR $ETCD_BIN_DIR $KWOK_BIN_DIR $HELM_BIN_DIR $CRANE_BIN_DIR"
