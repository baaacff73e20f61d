#!/usr/bin/env bash
# Stops exactly the processes cluster-up started (by PID file) and removes the cluster state.
source "$(dirname "$0")/lib.sh"
source "$HACK_DIR/cluster-lib.sh"

[ -d "$CLUSTER_DIR" ] || { log "no cluster state at $CLUSTER_DIR"; exit 0; }
stop_components
rm -rf "$CLUSTER_DIR"
log "cluster state removed"
