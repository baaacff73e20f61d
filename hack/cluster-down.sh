#!/usr/bin/env bash
# Stops exactly the processes cluster-up started (by PID file) and removes the cluster state.
source "$(dirname "$0")/lib.sh"
source "$HACK_DIR/cluster-lib.sh"

[ -d "$CLUSTER_DIR" ] || { log "no cluster state at $CLUSTER_DIR"; exit 0; }
# Only stop a PID that still runs what we started (its command line names the cluster dir), so
# a reused PID is never killed. TERM everything, give it 10s, then KILL what is left.
pids=()
for name in "${COMPONENTS[@]}"; do
  pidfile="$CLUSTER_DIR/pids/$name.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null && grep -qaF -- "$CLUSTER_DIR" "/proc/$pid/cmdline"; then
    kill -TERM "$pid" 2>/dev/null || true
    pids+=("$pid")
    log "stopping $name"
  fi
done
for _ in $(seq 1 100); do
  running=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && running=1; done
  [ "$running" = 0 ] && break
  sleep 0.1
done
for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
rm -rf "$CLUSTER_DIR"
log "cluster state removed"
