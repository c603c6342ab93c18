#!/usr/bin/env bash
# `make online`: a redis-server of its own (a temporary folder, 127.0.0.1), the click generator with
# concept drift, `downpour train examples/online.yaml` exporting every second, and `downpour serve`
# answering from the export; after ONLINE_S seconds the job stops (final checkpoint and export),
# a prediction and the serving metrics are shown, and everything started here is stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
ONLINE_S=${ONLINE_S:-60}
RATE=${RATE:-3000}
PORT=${REDIS_PORT:-6390}
SERVE_PORT=${SERVE_PORT:-8090}
DIR=$(mktemp -d /tmp/downpour-online.XXXXXX)
URL="redis://127.0.0.1:$PORT/0?stream=clicks&partitions=2"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
redis-server --port "$PORT" --bind 127.0.0.1 --dir "$DIR" --appendonly yes --save "" >"$DIR/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
.venv/bin/downpour datagen criteo --stream "$URL" --rate "$RATE" --events $((RATE * (ONLINE_S + 30))) --drift-every $((RATE * 20)) &
pids+=($!)
for _ in $(seq 100); do [ "$(redis-cli -p "$PORT" exists clicks:1)" = 1 ] && break; sleep 0.1; done
.venv/bin/downpour serve "$DIR/export" --port "$SERVE_PORT" --poll-s 0.5 &
pids+=($!)
.venv/bin/downpour train examples/online.yaml --set data.url="$URL" --set export.url="$DIR/export" \
    --set data.args.max_seconds="$ONLINE_S" --run-dir "$DIR/run"
sleep 1
echo "--- a prediction from the served model:"
curl -s -X POST "http://127.0.0.1:$SERVE_PORT/predict" -H 'Content-Type: application/json' \
    -d '{"instances": [{"I1": 1, "I2": 5, "C1": "68fd1e64", "C2": "80e26c9b"}]}'
echo
echo "--- serving metrics:"
curl -s "http://127.0.0.1:$SERVE_PORT/metrics" | grep -E '^downpour_serve_(version|freshness|versions|requests)'
echo "run folder and export: $DIR"
