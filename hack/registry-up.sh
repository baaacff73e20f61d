#!/usr/bin/env bash
# Serves a real OCI registry (Debian's docker-registry) on loopback with TLS from the cluster CA
# and htpasswd auth, and pushes a small runtime image under several version tags.
# Run by cluster-up.sh; connection facts land in .cluster/registry.env.
source "$(dirname "$0")/lib.sh"
source "$HACK_DIR/cluster-lib.sh"
source "$CLUSTER_DIR/ports.env"

REG="$CLUSTER_DIR/registry"
PKI="$CLUSTER_DIR/pki"
USERNAME=pf-e2e
PASSWORD=$(openssl rand -hex 16)
mkdir -p "$REG/data" "$REG/certs.d"
htpasswd -Bbn "$USERNAME" "$PASSWORD" >"$REG/htpasswd"
cp "$PKI/ca.crt" "$REG/certs.d/ca.crt"
cat >"$REG/config.yml" <<CONFIG
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $REG/data}
  delete: {enabled: true}
http:
  addr: 127.0.0.1:$REGISTRY_PORT
  tls: {certificate: $PKI/registry.crt, key: $PKI/registry.key}
auth:
  htpasswd: {realm: promptflow-local, path: $REG/htpasswd}
CONFIG
start registry docker-registry serve "$REG/config.yml"
wait_for registry 30 curl -fsS --cacert "$PKI/ca.crt" -u "$USERNAME:$PASSWORD" "https://127.0.0.1:$REGISTRY_PORT/v2/"

REPOSITORY="127.0.0.1:$REGISTRY_PORT/azureml/promptflow/promptflow-runtime-stable"
# The tags version checks see: dated releases (one upstream marked "do not use") and `latest`.
RUNTIME_TAGS="20240101.v1 20240222.v4 20240501.v2 20241214.v1"
LATEST_TAG=20240501.v2
layout="$REG/layout"
"$HACK_DIR/oci-layout.sh" "$layout" $RUNTIME_TAGS
for tag in $RUNTIME_TAGS latest; do
  source_tag=$tag; [ "$tag" = latest ] && source_tag=$LATEST_TAG
  skopeo copy --quiet --dest-creds "$USERNAME:$PASSWORD" --dest-cert-dir "$REG/certs.d" \
    "oci:$layout:$source_tag" "docker://$REPOSITORY:$tag" >>"$CLUSTER_DIR/logs/registry-push.log" 2>&1 \
    || { tail -n 20 "$CLUSTER_DIR/logs/registry-push.log" >&2; die "pushing $tag failed"; }
done

cat >"$CLUSTER_DIR/registry.env" <<ENV
REGISTRY_HOST=127.0.0.1:$REGISTRY_PORT
REGISTRY_USERNAME=$USERNAME
REGISTRY_PASSWORD=$PASSWORD
REGISTRY_CA_FILE=$PKI/ca.crt
RUNTIME_REPOSITORY=$REPOSITORY
RUNTIME_TAGS="$RUNTIME_TAGS latest"
ENV
chmod 600 "$CLUSTER_DIR/registry.env"
log "registry up at https://127.0.0.1:$REGISTRY_PORT with tags: $RUNTIME_TAGS latest"
