#!/usr/bin/env bash
# The main job, on loopback: installs what is missing, starts NATS, a registry, a webhook
# receiver and `shipperd all`, builds a sample bundle, uploads it, and shows what landed
# in the registry and which events were heard. Everything stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
echo "== building"
cargo build --locked -q -p shipperd -p shipperd-tests --bins
BIN=target/debug

DEMO=.demo
rm -rf "$DEMO"; mkdir -p "$DEMO"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

NATS_PORT=$($BIN/shipperd-dev free-port)
REG_PORT=$($BIN/shipperd-dev free-port)
API_PORT=$($BIN/shipperd-dev free-port)
HOOK_PORT=$($BIN/shipperd-dev free-port)
SECRET="whsec_$(head -c 24 /dev/urandom | base64)"
NATS_BIN=$(command -v nats-server || echo /usr/sbin/nats-server)

wait_port() { # port what
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$2 did not come up on port $1" >&2; exit 1
}

echo "== starting nats-server (127.0.0.1:$NATS_PORT), docker-registry (127.0.0.1:$REG_PORT)"
"$NATS_BIN" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$DEMO/nats" >"$DEMO/nats.log" 2>&1 & PIDS+=($!)
$BIN/shipperd-dev registry-config --port "$REG_PORT" --root "$PWD/$DEMO/registry" >"$DEMO/registry.yml"
docker-registry serve "$DEMO/registry.yml" >"$DEMO/registry.log" 2>&1 & PIDS+=($!)
$BIN/shipperd-dev webhook-sink --port "$HOOK_PORT" --secret "$SECRET" --seconds 600 >"$DEMO/events.log" 2>&1 & PIDS+=($!)
wait_port "$NATS_PORT" nats-server; wait_port "$REG_PORT" docker-registry; wait_port "$HOOK_PORT" webhook-sink

echo "== starting shipperd all (ingest API on 127.0.0.1:$API_PORT)"
RUST_LOG=${RUST_LOG:-info} \
SHIPPERD_NATS_URL="nats://127.0.0.1:$NATS_PORT" SHIPPERD_DATA_DIR="$DEMO/data" \
SHIPPERD_LISTEN="127.0.0.1:$API_PORT" SHIPPERD_REGISTRY="http://127.0.0.1:$REG_PORT" \
SHIPPERD_REGISTRY_PREFIX=mirror SHIPPERD_WEBHOOKS="http://127.0.0.1:$HOOK_PORT/hook" \
SHIPPERD_WEBHOOK_SECRET="$SECRET" SHIPPERD_DROP_DIR="$DEMO/drop" \
  $BIN/shipperd all >"$DEMO/shipperd.log" 2>&1 & PIDS+=($!)
wait_port "$API_PORT" shipperd

echo "== building a sample bundle"
$BIN/shipperd-dev sample-bundle --out "$DEMO/sample.squashfs" --salt "demo-$(date +%s)"
SHA=$(sha256sum "$DEMO/sample.squashfs" | cut -d' ' -f1)
ls -l "$DEMO/sample.squashfs"

echo "== uploading: PUT /v1/bundles/sample.squashfs?sha256=$SHA"
curl -sS --fail-with-body -T "$DEMO/sample.squashfs" "http://127.0.0.1:$API_PORT/v1/bundles/sample.squashfs?sha256=$SHA" | jq .

echo "== waiting for the bundle to be published"
for _ in $(seq 1 300); do
  PHASE=$(curl -sS "http://127.0.0.1:$API_PORT/v1/bundles/$SHA" | jq -r .phase)
  case "$PHASE" in Published|Failed) break;; esac
  sleep 0.2
done
curl -sS "http://127.0.0.1:$API_PORT/v1/bundles/$SHA" | jq '{phase, error, images: [.images[] | {source, target, digest, phase}]}'

echo "== the registry now holds"
for repo in $(curl -sS "http://127.0.0.1:$REG_PORT/v2/_catalog" | jq -r '.repositories[]'); do
  echo "  $repo: $(curl -sS "http://127.0.0.1:$REG_PORT/v2/$repo/tags/list" | jq -c .tags)"
done
echo "== skopeo inspect docker://127.0.0.1:$REG_PORT/mirror/demo/multi:latest (raw index, digest checked)"
skopeo inspect --raw --tls-verify=false "docker://127.0.0.1:$REG_PORT/mirror/demo/multi:latest" | sha256sum

echo "== webhook events received"
sleep 1
cat "$DEMO/events.log"
[ "$PHASE" = Published ] || { echo "bundle ended $PHASE; see $DEMO/shipperd.log" >&2; exit 1; }
echo "== done: logs and data are in $DEMO/"
