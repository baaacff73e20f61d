#!/usr/bin/env bash
# Exits 0 when the local cluster is up and healthy.
source "$(dirname "$0")/lib.sh"
source "$HACK_DIR/cluster-lib.sh"
cluster_healthy && { print_exports; exit 0; }
exit 1
