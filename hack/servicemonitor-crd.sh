#!/usr/bin/env bash
# Generates the Prometheus Operator's ServiceMonitor CRD from its Go API types
# (github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring, the version pinned in
# versions.env) with controller-gen, into the cache, and prints the file's path. The e2e suite
# installs it so the chart's ServiceMonitor meets the real schema. A warm run is a no-op.
source "$(dirname "$0")/lib.sh"

work="$PF_CACHE/build/servicemonitor-crd-$PROMETHEUS_OPERATOR_VERSION-$CONTROLLER_TOOLS_VERSION"
crd="$work/crds/monitoring.coreos.com_servicemonitors.yaml"
if [ ! -f "$crd" ]; then
  mkdir -p "$work/bin"
  log "generating the ServiceMonitor CRD ($PROMETHEUS_OPERATOR_VERSION, controller-gen $CONTROLLER_TOOLS_VERSION)"
  CGO_ENABLED=0 GOBIN="$work/bin" go install "sigs.k8s.io/controller-tools/cmd/controller-gen@$CONTROLLER_TOOLS_VERSION"
  module=github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring
  printf 'module local/servicemonitor-crd\n\ngo 1.26\n\nrequire %s %s\n' "$module" "$PROMETHEUS_OPERATOR_VERSION" >"$work/go.mod"
  printf 'package crd\n\nimport _ "%s/v1"\n' "$module" >"$work/crd.go"
  (cd "$work" && GOFLAGS=-mod=mod go mod tidy >/dev/null 2>&1) || die "go mod tidy for $module failed"
  dir=$(cd "$work" && go list -m -f '{{.Dir}}' "$module")
  (cd "$work" && bin/controller-gen crd:crdVersions=v1 "paths=$dir/v1/..." output:crd:dir="$work/crds") \
    || die "controller-gen failed"
fi
echo "$crd"
