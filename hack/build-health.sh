#!/usr/bin/env bash
# Builds pf-health (tools/health: kstatus, Flux CEL and Argo CD Lua health checks on live objects) into
# a cache dir keyed by the module's content, and prints the binary's path. A warm run is a no-op.
source "$(dirname "$0")/lib.sh"

src="$REPO_ROOT/tools/health"
hash=$(cd "$src" && export LC_ALL=C && cat go.mod go.sum ./*.go | sha256sum | cut -c1-12)
out="$PF_CACHE/bin/health-$hash"

if [ ! -x "$out/pf-health" ]; then
  mkdir -p "$out"
  log "building pf-health ($hash)"
  (cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/pf-health.tmp" .) || die "go build pf-health failed"
  mv "$out/pf-health.tmp" "$out/pf-health"
fi
echo "$out/pf-health"
