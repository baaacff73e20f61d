#!/usr/bin/env bash
# Helpers for cluster-up/cluster-down: process supervision by PID file, ports, PKI, kubeconfigs.

CLUSTER_DIR=${PF_CLUSTER_DIR:-$REPO_ROOT/.cluster}
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok registry)

require_tools() {
  local missing=()
  for tool in kubectl openssl curl python3 docker-registry skopeo htpasswd; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  [ ${#missing[@]} -eq 0 ] || die "missing tools: ${missing[*]} (run hack/install-deps.sh)"
}

# free_ports N prints N distinct free TCP ports on loopback. One process holds all the sockets
# until it has them all, so no port is handed out twice.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
sockets = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    sockets.append(s)
print(" ".join(str(s.getsockname()[1]) for s in sockets))
for s in sockets:
    s.close()
PY
}

# start NAME CMD... runs CMD in its own session, logs to logs/NAME.log, records its PID.
start() {
  local name=$1; shift
  log "starting $name"
  setsid "$@" >"$CLUSTER_DIR/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$CLUSTER_DIR/pids/$name.pid"
}

alive() {
  local pidfile="$CLUSTER_DIR/pids/$1.pid"
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

# wait_for NAME SECONDS CMD...: polls CMD; fails fast with the log tail when a component died.
wait_for() {
  local name=$1 timeout=$2; shift 2
  local deadline=$(( $(date +%s) + timeout ))
  until "$@" >/dev/null 2>&1; do
    local component
    for component in "${COMPONENTS[@]}"; do
      if [ -f "$CLUSTER_DIR/pids/$component.pid" ] && ! alive "$component"; then
        log "$component exited; last lines of its log:"
        tail -n 30 "$CLUSTER_DIR/logs/$component.log" >&2 || true
        die "$component died while waiting for $name"
      fi
    done
    if [ "$(date +%s)" -ge "$deadline" ]; then
      [ -f "$CLUSTER_DIR/logs/$name.log" ] && tail -n 30 "$CLUSTER_DIR/logs/$name.log" >&2
      die "timed out after ${timeout}s waiting for $name"
    fi
    sleep 0.5
  done
}

# stop_components: TERM every component still running from this cluster dir (a PID is only
# signalled when its command line names the cluster dir, so a reused PID is never hit), give them
# 10 s, then KILL what is left.
stop_components() {
  local name pidfile pid pids=() running
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
}

cluster_healthy() {
  local component
  [ -f "$CLUSTER_DIR/kubeconfig" ] || return 1
  for component in "${COMPONENTS[@]}"; do alive "$component" || return 1; done
  kubectl --kubeconfig="$CLUSTER_DIR/kubeconfig" get --raw=/readyz >/dev/null 2>&1
}

print_exports() {
  echo "export KUBECONFIG=$CLUSTER_DIR/kubeconfig"
}

# A CA, the API server's serving cert, client certs, and the service-account signing key.
generate_pki() {
  local pki="$CLUSTER_DIR/pki"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=promptflow-local-ca" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  issue_cert apiserver "/CN=kube-apiserver" \
    "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth"
  issue_cert registry "/CN=registry" "subjectAltName=IP:127.0.0.1,DNS:localhost
extendedKeyUsage=serverAuth"
  issue_cert admin "/O=system:masters/CN=admin" "extendedKeyUsage=clientAuth"
  issue_cert controller-manager "/CN=system:kube-controller-manager" "extendedKeyUsage=clientAuth"
  issue_cert scheduler "/CN=system:kube-scheduler" "extendedKeyUsage=clientAuth"
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  chmod 600 "$pki"/*.key

  write_kubeconfig "$CLUSTER_DIR/kubeconfig" admin
  write_kubeconfig "$CLUSTER_DIR/controller-manager.kubeconfig" controller-manager
  write_kubeconfig "$CLUSTER_DIR/scheduler.kubeconfig" scheduler
}

issue_cert() {
  local name=$1 subject=$2 extensions=$3 pki="$CLUSTER_DIR/pki"
  openssl req -newkey rsa:2048 -nodes -subj "$subject" -keyout "$pki/$name.key" -out "$pki/$name.csr" 2>/dev/null
  printf '%s\n' "$extensions" >"$pki/$name.ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 3650 -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null
}

# The server address is filled in once the port is known; kubectl config writes the file.
write_kubeconfig() {
  local file=$1 user=$2 pki="$CLUSTER_DIR/pki"
  local k=(kubectl --kubeconfig="$file" config)
  "${k[@]}" set-cluster local --server="https://127.0.0.1:${APISERVER_PORT:-0}" --certificate-authority="$pki/ca.crt" --embed-certs=true >/dev/null
  "${k[@]}" set-credentials "$user" --client-certificate="$pki/$user.crt" --client-key="$pki/$user.key" --embed-certs=true >/dev/null
  "${k[@]}" set-context local --cluster=local --user="$user" >/dev/null
  "${k[@]}" use-context local >/dev/null
}

# kwok's configuration: its own default stages (read from the pinned kwok module, as kwokctl
# composes them: node initialize, lease heartbeat, pod ready/complete/delete) plus ours.
write_kwok_config() {
  local out=$1 kwok_src stage
  kwok_src=$(cd "$PF_CACHE" && go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/.*"Dir": "\(.*\)",*/\1/p')
  [ -d "$kwok_src/kustomize/stage" ] || die "kwok module source for $KWOK_VERSION not found"
  {
    printf 'apiVersion: config.kwok.x-k8s.io/v1alpha1\nkind: KwokConfiguration\noptions:\n  podPlayStageParallelism: 8\n  nodePlayStageParallelism: 4\n  nodeLeaseParallelism: 4\n  podsOnNodeSyncParallelism: 2\n'
    for stage in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
                 pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
      echo '---'; cat "$kwok_src/kustomize/stage/$stage"
    done
    for stage in "$HACK_DIR"/kwok-stages/*.yaml; do
      if [ -f "$stage" ]; then echo "---"; cat "$stage"; fi
    done
  } >"$out"
}
