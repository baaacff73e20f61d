#!/usr/bin/env bash
# Starts a real local control plane on loopback: etcd, kube-apiserver (TLS, RBAC, ServiceAccount
# admission), kube-controller-manager, kube-scheduler, kwok with fake nodes, and a TLS registry with
# htpasswd auth. Idempotent: a healthy cluster is left as it is; a stale one is cleaned first.
source "$(dirname "$0")/lib.sh"
source "$HACK_DIR/cluster-lib.sh"

if cluster_healthy; then
  # kwok reads its stages at start: a cluster started before hack/kwok-stages changed is started
  # again, so every test sees the stages it was written for.
  write_kwok_config "$CLUSTER_DIR/kwok.yaml.next"
  if cmp -s "$CLUSTER_DIR/kwok.yaml.next" "$CLUSTER_DIR/kwok.yaml"; then
    rm -f "$CLUSTER_DIR/kwok.yaml.next"
    log "cluster already up"
    print_exports
    exit 0
  fi
  log "the kwok stages changed since the cluster started: starting it again"
  "$HACK_DIR/cluster-down.sh"
elif [ -d "$CLUSTER_DIR" ]; then
  log "found a stale $CLUSTER_DIR from an earlier run: cleaning it"
  "$HACK_DIR/cluster-down.sh"
fi

"$HACK_DIR/build-components.sh"
require_tools

started=$(date +%s)
mkdir -p "$CLUSTER_DIR"/{pki,logs,pids,etcd,registry}
# A failed start stops what it started; the state stays for its logs (the next run cleans it).
trap 'rc=$?; if [ $rc -ne 0 ]; then log "cluster-up failed; stopping the components it started"; stop_components; fi' EXIT
read -r ETCD_PORT ETCD_PEER_PORT APISERVER_PORT KCM_PORT SCHEDULER_PORT KWOK_PORT REGISTRY_PORT < <(free_ports 7)
cat >"$CLUSTER_DIR/ports.env" <<PORTS
ETCD_PORT=$ETCD_PORT
APISERVER_PORT=$APISERVER_PORT
REGISTRY_PORT=$REGISTRY_PORT
PORTS

generate_pki

start etcd "$ETCD_BIN_DIR/etcd" \
  --name=local --data-dir="$CLUSTER_DIR/etcd" --unsafe-no-fsync \
  --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster="local=http://127.0.0.1:$ETCD_PEER_PORT" --listen-metrics-urls="" \
  --quota-backend-bytes=2147483648 --log-level=warn
wait_for etcd 60 curl -fsS "http://127.0.0.1:$ETCD_PORT/health"

PKI="$CLUSTER_DIR/pki"
start kube-apiserver "$KUBE_BIN_DIR/kube-apiserver" \
  --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$APISERVER_PORT" \
  --cert-dir="$PKI" --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
  --client-ca-file="$PKI/ca.crt" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$PKI/sa.key" --service-account-signing-key-file="$PKI/sa.key" \
  --service-cluster-ip-range=10.0.0.0/24 \
  --authorization-mode=Node,RBAC \
  --enable-admission-plugins=NodeRestriction \
  --allow-privileged=true \
  --profiling=false
wait_for kube-apiserver 120 kubectl --kubeconfig="$CLUSTER_DIR/kubeconfig" get --raw=/readyz

# kwok does not give a Running pod its readiness back as a kubelet would once its node is heard
# from again, so a control-plane outage in the fault tests must not mark nodes (and with them
# every pod) not ready: the node monitor waits 10 minutes.
start kube-controller-manager "$KUBE_BIN_DIR/kube-controller-manager" \
  --kubeconfig="$CLUSTER_DIR/controller-manager.kubeconfig" \
  --authentication-kubeconfig="$CLUSTER_DIR/controller-manager.kubeconfig" \
  --authorization-kubeconfig="$CLUSTER_DIR/controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$KCM_PORT" \
  --leader-elect=false --use-service-account-credentials=true \
  --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
  --service-cluster-ip-range=10.0.0.0/24 --allocate-node-cidrs=false \
  --controllers='*' --profiling=false \
  --node-monitor-grace-period=10m
start kube-scheduler "$KUBE_BIN_DIR/kube-scheduler" \
  --kubeconfig="$CLUSTER_DIR/scheduler.kubeconfig" \
  --authentication-kubeconfig="$CLUSTER_DIR/scheduler.kubeconfig" \
  --authorization-kubeconfig="$CLUSTER_DIR/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$SCHEDULER_PORT" --leader-elect=false --profiling=false
wait_for kube-controller-manager 60 curl -fsSk "https://127.0.0.1:$KCM_PORT/healthz"
wait_for kube-scheduler 60 curl -fsSk "https://127.0.0.1:$SCHEDULER_PORT/healthz"

# kwok plays the kubelet for nodes annotated kwok.x-k8s.io/node=fake; pod IPs come from loopback,
# so a test can bind a real process to a pod's IP.
write_kwok_config "$CLUSTER_DIR/kwok.yaml"
start kwok "$KWOK_BIN_DIR/kwok" --config="$CLUSTER_DIR/kwok.yaml" \
  --kubeconfig="$CLUSTER_DIR/kubeconfig" --manage-all-nodes=false \
  --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
  --cidr=127.0.1.0/24 --node-ip=127.0.0.1 --node-lease-duration-seconds=40 \
  --server-address="127.0.0.1:$KWOK_PORT"
wait_for kwok 30 curl -fsS "http://127.0.0.1:$KWOK_PORT/healthz"
kubectl --kubeconfig="$CLUSTER_DIR/kubeconfig" apply -f "$HACK_DIR/nodes.yaml" >/dev/null
# A node kept from an earlier cluster-up keeps its status: bring its capacity to nodes.yaml's.
for node in kwok-node-0 kwok-node-1 kwok-node-2; do
  kubectl --kubeconfig="$CLUSTER_DIR/kubeconfig" patch node "$node" --subresource=status --type=merge \
    -p '{"status":{"allocatable":{"ephemeral-storage":"16Ti"},"capacity":{"ephemeral-storage":"16Ti"}}}' >/dev/null
done
wait_for nodes 90 kubectl --kubeconfig="$CLUSTER_DIR/kubeconfig" wait --for=condition=Ready node --all --timeout=5s
wait_for service-accounts 60 kubectl --kubeconfig="$CLUSTER_DIR/kubeconfig" get serviceaccount default -n default

"$HACK_DIR/registry-up.sh"

log "cluster up in $(( $(date +%s) - started ))s (Kubernetes $KUBE_VERSION, logs in $CLUSTER_DIR/logs)"
print_exports
