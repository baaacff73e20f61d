#!/usr/bin/env bash
# make run: use the cluster in $KUBECONFIG when it answers, else start the local one; install the
# CRDs; run the operator in the foreground.
source "$(dirname "$0")/lib.sh"
source "$HACK_DIR/cluster-lib.sh"

if [ -n "${KUBECONFIG:-}" ] && kubectl get --raw=/readyz >/dev/null 2>&1; then
  log "using the cluster in KUBECONFIG ($(kubectl config current-context 2>/dev/null || echo unknown context))"
else
  [ -n "${KUBECONFIG:-}" ] && log "the cluster in KUBECONFIG does not answer; starting the local cluster"
  "$HACK_DIR/install-deps.sh"
  "$HACK_DIR/cluster-up.sh" >/dev/null
  export KUBECONFIG="$CLUSTER_DIR/kubeconfig"
fi
kubectl apply --server-side --field-manager=promptflow-operator-install -f "$REPO_ROOT/config/crd/" >/dev/null
kubectl wait --for=condition=Established --timeout=60s -f "$REPO_ROOT/config/crd/" >/dev/null
log "CRDs installed"
exec "$OPERATOR_BIN" "$@"
