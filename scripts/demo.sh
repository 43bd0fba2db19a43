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
source scripts/lib.sh
start_stack

echo "== building a sample bundle"
$BIN/shipperd-dev sample-bundle --out "$DEMO/sample.squashfs" --salt "demo-$(date +%s)"
ls -l "$DEMO/sample.squashfs"
upload "$DEMO/sample.squashfs" sample.squashfs

echo "== waiting for the bundle to be published"
wait_done
curl -sS "http://127.0.0.1:$API_PORT/v1/bundles/$SHA" | jq '{phase, error, counts, images: [.images[] | {source, target, digest, phase}]}'

echo "== the registry now holds"
for repo in $(curl -sS "http://127.0.0.1:$REG_PORT/v2/_catalog" | jq -r '.repositories[]'); do
  echo "  $repo: $(curl -sS "http://127.0.0.1:$REG_PORT/v2/$repo/tags/list" | jq -c .tags)"
done
echo "== skopeo inspect docker://127.0.0.1:$REG_PORT/mirror/demo/multi:latest (raw index, digest checked)"
skopeo inspect --raw --tls-verify=false "docker://127.0.0.1:$REG_PORT/mirror/demo/multi:latest" | sha256sum

echo "== webhook events received"
for _ in $(seq 1 100); do grep -q 'bundle\.\(published\|failed\)' "$DEMO/events.log" && break; sleep 0.1; done
cat "$DEMO/events.log"
[ "$PHASE" = Published ] || { echo "bundle ended $PHASE; see $DEMO/shipperd.log" >&2; exit 1; }
echo "== done: logs and data are in $DEMO/"
