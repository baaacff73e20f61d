#!/usr/bin/env bash
# oci-layout.sh DIR TAG...: writes an OCI image layout with one small image per tag. The images
# share a layer and differ in their config (a version label), so every tag has its own digest.
source "$(dirname "$0")/lib.sh"
dir=$1; shift
rm -rf "$dir"; mkdir -p "$dir/blobs/sha256"

put_blob() { # put_blob FILE -> prints "digest size" and stores the blob
  local digest size
  digest=$(sha256sum "$1" | cut -d' ' -f1); size=$(stat -c %s "$1")
  cp "$1" "$dir/blobs/sha256/$digest"
  echo "$digest $size"
}

scratch=$(mktemp -d); trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/rootfs/etc"
echo "prompt flow runtime (local test image)" >"$scratch/rootfs/etc/promptflow-runtime"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$scratch/rootfs" -cf "$scratch/layer.tar" .
gzip -n -c "$scratch/layer.tar" >"$scratch/layer.tar.gz"
diff_id=$(sha256sum "$scratch/layer.tar" | cut -d' ' -f1)
read -r layer_digest layer_size < <(put_blob "$scratch/layer.tar.gz")

manifests=()
for tag in "$@"; do
  printf '{"architecture":"amd64","os":"linux","config":{"ExposedPorts":{"8080/tcp":{}},"Labels":{"org.opencontainers.image.version":"%s"}},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$tag" "$diff_id" >"$scratch/config.json"
  read -r config_digest config_size < <(put_blob "$scratch/config.json")
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' \
    "$config_digest" "$config_size" "$layer_digest" "$layer_size" >"$scratch/manifest.json"
  read -r manifest_digest manifest_size < <(put_blob "$scratch/manifest.json")
  manifests+=("$(printf '{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"%s"}}' \
    "$manifest_digest" "$manifest_size" "$tag")")
done
printf '{"imageLayoutVersion":"1.0.0"}' >"$dir/oci-layout"
(IFS=,; printf '{"schemaVersion":2,"manifests":[%s]}' "${manifests[*]}") >"$dir/index.json"
