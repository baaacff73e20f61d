#!/usr/bin/env bash
# image.sh: builds the operator's OCI image without a container engine and pushes it to the local
# registry (started with the cluster). The image equals what the Dockerfile builds: the release
# binary on a distroless-style Debian 12 base (glibc, libgcc, CA certificates, a nonroot user),
# assembled as one reproducible layer here and pushed with crane (go-containerregistry).
# Writes .cluster/image.env (OPERATOR_IMAGE, OPERATOR_IMAGE_DIGEST) and prints the reference.
source "$(dirname "$0")/lib.sh"
source "$HACK_DIR/cluster-lib.sh"
# The modes in the layer must not depend on the caller's umask (user 65532 reads everything).
umask 022

[ -f "$CLUSTER_DIR/registry.env" ] || die "the local registry is not up: run make cluster-up"
source "$CLUSTER_DIR/registry.env"
"$HACK_DIR/build-components.sh" >/dev/null
crane="$CRANE_BIN_DIR/crane"

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PF_CACHE/target}
log "cargo build --release --bin promptflow-operator"
(cd "$REPO_ROOT" && cargo build --quiet --release --locked --bin promptflow-operator)
binary="$CARGO_TARGET_DIR/release/promptflow-operator"
version=$(cd "$REPO_ROOT" && cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="promptflow-operator"))')

work="$PF_CACHE/image"
rm -rf "$work"; mkdir -p "$work/rootfs"
root="$work/rootfs"
mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/tmp" "$root/home/nonroot"
strip -o "$root/usr/local/bin/promptflow-operator" "$binary"
# The shared libraries the binary loads (and the loader), at the paths it looks them up.
for lib in $(ldd "$binary" | grep -oE '/[^ ]+\.so[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
chmod 1777 "$root/tmp"

# One layer, byte-for-byte reproducible: sorted names, no timestamps, numeric owners.
tar --sort=name --mtime=@0 --numeric-owner --owner=0 --group=0 \
  --transform 's,^\./,,' --exclude=./home/nonroot -C "$root" -cf "$work/layer.tar" .
tar --mtime=@0 --numeric-owner --owner=65532 --group=65532 -C "$root" -rf "$work/layer.tar" home/nonroot
gzip -n -9 -c "$work/layer.tar" >"$work/layer.tar.gz"

reference="$REGISTRY_HOST/promptflow-operator:$version"
case "$(rustc -vV | sed -n 's/^host: //p')" in
  x86_64-*-linux-*) platform=linux/amd64 ;;
  aarch64-*-linux-*) platform=linux/arm64 ;;
  *) die "no OCI platform known for this Rust host" ;;
esac
export DOCKER_CONFIG="$work/docker"
export SSL_CERT_FILE="$REGISTRY_CA_FILE"
"$crane" auth login "$REGISTRY_HOST" -u "$REGISTRY_USERNAME" --password-stdin <<<"$REGISTRY_PASSWORD" >/dev/null 2>&1 \
  || die "crane could not log in to the local registry"
crane_log="$work/crane.log"
run_crane() { "$crane" "$@" >>"$crane_log" 2>&1 || { tail -n 20 "$crane_log" >&2; die "crane $1 failed"; }; }
# The layer goes in under a build tag; the versioned tag appears only on the finished image.
staging="$REGISTRY_HOST/promptflow-operator:build-$version"
run_crane append --oci-empty-base -f "$work/layer.tar.gz" -t "$staging"
revision=$(git -C "$REPO_ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
run_crane mutate "$staging" -t "$reference" \
  --set-platform "$platform" \
  --entrypoint /usr/local/bin/promptflow-operator \
  --user 65532:65532 --workdir / \
  --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --exposed-ports 8080/tcp \
  -l org.opencontainers.image.title=promptflow-operator \
  -l org.opencontainers.image.version="$version" \
  -l org.opencontainers.image.revision="$revision" \
  -l org.opencontainers.image.licenses=Apache-2.0
digest=$("$crane" digest "$reference")
size=$(stat -c %s "$work/layer.tar.gz")
cat >"$CLUSTER_DIR/image.env" <<ENV
OPERATOR_IMAGE=$reference
OPERATOR_IMAGE_DIGEST=$digest
ENV
log "pushed $reference@$digest (one layer, $((size / 1024)) KiB compressed)"
echo "$reference@$digest"
