#!/usr/bin/env bash
# Installs the Debian packages the local cluster, the registry and the bench need, when missing. Idempotent.
source "$(dirname "$0")/lib.sh"

need=()
command -v kubectl >/dev/null || need+=(kubectl)
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v skopeo >/dev/null || need+=(skopeo)
command -v htpasswd >/dev/null || need+=(apache2-utils)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
# The bench's load generator for the activity proxy.
command -v wrk >/dev/null || need+=(wrk)
# The bench's chart draws its text with DejaVu Sans.
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v go >/dev/null || die "the Go toolchain is required to build the control plane"
command -v cargo >/dev/null || die "the Rust toolchain is required"
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
