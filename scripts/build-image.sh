#!/usr/bin/env bash
# Builds ShipperD's container image without a container engine: a release build of
# shipperd, stripped, then an OCI image layout in target/image (or $1) with the binary,
# the shared libraries it loads, CA certificates and a non-root user (65532). Every
# time stamp is SOURCE_DATE_EPOCH (0 unless set), so the same binary gives the same
# digest. The Containerfile builds the same image with podman or docker.
#
# Carry it in as any bundle: tar the layout and upload it to ShipperD, or
#   skopeo copy oci:target/image:shipperd:0.1.0 docker://<registry>/shipperd/shipperd:0.1.0
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/image}
cargo build --release --locked -p shipperd
cp target/release/shipperd target/release/shipperd.image
strip target/release/shipperd.image 2>/dev/null || echo "no strip: the image carries symbols" >&2
cargo run -q --locked -p shipperd-tests --bin shipperd-dev -- \
  build-image --binary target/release/shipperd.image --out "$out"
tar -C "$out" -cf "$out.tar" oci-layout index.json blobs
echo "OCI layout: $out (as a bundle: $out.tar)"
