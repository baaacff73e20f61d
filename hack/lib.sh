#!/usr/bin/env bash
# Shared settings for the hack/ scripts: version pins and the cache root outside the clone.
set -euo pipefail

HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$HACK_DIR/.." && pwd)
# shellcheck source=versions.env
source "$HACK_DIR/versions.env"

# Everything expensive lives outside the clone so a fresh CI clone reuses it.
PF_CACHE=${PF_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/promptflow-operator}
export PF_CACHE
KUBE_BIN_DIR="$PF_CACHE/bin/kubernetes-$KUBE_VERSION"
ETCD_BIN_DIR="$PF_CACHE/bin/etcd-$ETCD_VERSION"
KWOK_BIN_DIR="$PF_CACHE/bin/kwok-$KWOK_VERSION"
HELM_BIN_DIR="$PF_CACHE/bin/helm-$HELM_VERSION"
CRANE_BIN_DIR="$PF_CACHE/bin/crane-$CRANE_VERSION"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The kubectl built with the control plane matches the server's version; prefer it.
export PATH="$KUBE_BIN_DIR:$HELM_BIN_DIR:$PATH"
