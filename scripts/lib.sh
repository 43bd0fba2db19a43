# Shared by scripts/demo.sh and the benchmarks: start a loopback stack (NATS, a registry,
# a webhook receiver, shipperd all) under $DEMO, stopped when the script exits; extra
# registries and timing helpers for the benchmarks. Needs BIN (where shipperd and
# shipperd-dev are) and DEMO (a scratch directory).

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_port() { # port what
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$2 did not come up on port $1" >&2
  exit 1
}

# Sets NATS_PORT REG_PORT API_PORT HOOK_PORT SECRET SHIPPERD_PID.
start_stack() {
  rm -rf "$DEMO"; mkdir -p "$DEMO"
  NATS_PORT=$($BIN/shipperd-dev free-port)
  REG_PORT=$($BIN/shipperd-dev free-port)
  API_PORT=$($BIN/shipperd-dev free-port)
  HOOK_PORT=$($BIN/shipperd-dev free-port)
  SECRET="whsec_$(head -c 24 /dev/urandom | base64)"
  local nats_bin
  nats_bin=$(command -v nats-server || echo /usr/sbin/nats-server)

  echo "== starting nats-server (127.0.0.1:$NATS_PORT), docker-registry (127.0.0.1:$REG_PORT), webhook receiver (127.0.0.1:$HOOK_PORT)"
  "$nats_bin" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$DEMO/nats" >"$DEMO/nats.log" 2>&1 & NATS_PID=$!; PIDS+=($NATS_PID)
  $BIN/shipperd-dev registry-config --port "$REG_PORT" --root "$PWD/$DEMO/registry" >"$DEMO/registry.yml"
  docker-registry serve "$DEMO/registry.yml" >"$DEMO/registry.log" 2>&1 & PIDS+=($!)
  $BIN/shipperd-dev webhook-sink --port "$HOOK_PORT" --secret "$SECRET" --seconds 1800 >"$DEMO/events.log" 2>&1 & HOOK_PID=$!; PIDS+=($HOOK_PID)
  wait_port "$NATS_PORT" nats-server; wait_port "$REG_PORT" docker-registry; wait_port "$HOOK_PORT" webhook-sink

  echo "== starting shipperd all (ingest API on 127.0.0.1:$API_PORT)"
  RUST_LOG=${RUST_LOG:-info} \
  SHIPPERD_NATS_URL="nats://127.0.0.1:$NATS_PORT" SHIPPERD_DATA_DIR="$DEMO/data" \
  SHIPPERD_LISTEN="127.0.0.1:$API_PORT" SHIPPERD_REGISTRY="http://127.0.0.1:$REG_PORT" \
  SHIPPERD_REGISTRY_PREFIX=mirror SHIPPERD_WEBHOOKS="http://127.0.0.1:$HOOK_PORT/hook" \
  SHIPPERD_WEBHOOK_SECRET="$SECRET" SHIPPERD_DROP_DIR="$DEMO/drop" \
    $BIN/shipperd all >"$DEMO/shipperd.log" 2>&1 & SHIPPERD_PID=$!; PIDS+=($SHIPPERD_PID)
  wait_port "$API_PORT" shipperd
}

# upload FILE NAME: PUT with the checksum; sets SHA.
upload() {
  SHA=$(sha256sum "$1" | cut -d' ' -f1)
  echo "== uploading: PUT /v1/bundles/$2?sha256=$SHA"
  curl -sS --fail-with-body -T "$1" "http://127.0.0.1:$API_PORT/v1/bundles/$2?sha256=$SHA" | jq -c .
}

# wait_done: polls the bundle $SHA until it is Published or Failed (10 min at most); sets PHASE.
wait_done() {
  for _ in $(seq 1 3000); do
    PHASE=$(curl -sS "http://127.0.0.1:$API_PORT/v1/bundles/$SHA?limit=0" | jq -r .phase)
    case "$PHASE" in Published|Failed) return 0;; esac
    sleep 0.2
  done
  echo "bundle $SHA did not finish" >&2
  exit 1
}

# Timing helpers of the benchmarks.
now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l; }
cpu() { awk '{print ($14 + $15) / 100}' "/proc/$1/stat"; } # user + system seconds of PID

# start_registry NAME: another docker-registry on loopback, its storage and config under
# $W/NAME; sets RP (its port) and RPID.
start_registry() {
  RP=$($BIN/shipperd-dev free-port)
  $BIN/shipperd-dev registry-config --port "$RP" --root "$PWD/$W/$1" >"$W/$1.yml"
  docker-registry serve "$W/$1.yml" >"$W/$1.log" 2>&1 & PIDS+=($!)
  RPID=$!
  wait_port "$RP" docker-registry
}
