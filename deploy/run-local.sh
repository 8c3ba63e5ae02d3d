#!/usr/bin/env bash
# `make run`: a local single-node Kafka (unless KAFKA_BOOTSTRAP_SERVERS is set), the
# topics, the replicator on the embedded default store (./var/replicator) and a demo
# publisher. Ctrl-C stops the replicator cleanly (everything sealed and stored), then the
# broker this script started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPLICATOR=.venv/bin/replicator
KAFKA_DIR=var/kafka
DEMO_RATE="${DEMO_RATE:-300}"
started_broker=0

cleanup() {
  if [[ $started_broker == 1 ]]; then
    echo "stopping the local Kafka broker ..." >&2
    bash deploy/kafka/kafka.sh stop --dir "$KAFKA_DIR" >&2 || true
  fi
}
trap cleanup EXIT

if [[ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ]]; then
  bootstrap="$KAFKA_BOOTSTRAP_SERVERS"
  echo "using Kafka at $bootstrap (KAFKA_BOOTSTRAP_SERVERS)" >&2
elif bash deploy/kafka/kafka.sh status --dir "$KAFKA_DIR" >/dev/null 2>&1; then
  bootstrap="$(bash deploy/kafka/kafka.sh bootstrap --dir "$KAFKA_DIR")"
  echo "using the local Kafka broker already running at $bootstrap" >&2
else
  echo "starting a local Kafka broker (first run fetches the jars from Maven Central) ..." >&2
  started_broker=1
  if [[ -f "$KAFKA_DIR/server.properties" ]]; then
    bootstrap="$(bash deploy/kafka/kafka.sh start-existing --dir "$KAFKA_DIR")"
  else
    bootstrap="$(bash deploy/kafka/kafka.sh start --dir "$KAFKA_DIR")"
  fi
fi

export REPLICATOR_KAFKA_BOOTSTRAP_SERVERS="$bootstrap"
export REPLICATOR_INGEST_DATA_DIR="${REPLICATOR_INGEST_DATA_DIR:-./var/replicator}"
"$REPLICATOR" topics --partitions 3
echo "replicator: store ./var/replicator/store, demo publisher at ${DEMO_RATE} events/s." \
     "Admin API and metrics on http://127.0.0.1:9187 (bearer token in" \
     "${REPLICATOR_INGEST_DATA_DIR}/admin.token, created at start). In another shell:" \
     "export REPLICATOR_KAFKA_BOOTSTRAP_SERVERS=$bootstrap; .venv/bin/replicator status." \
     "Ctrl-C to stop." >&2
"$REPLICATOR" run --demo-rate "$DEMO_RATE" || status=$?
echo "see what was stored: .venv/bin/replicator backups list; rehearse a recovery:" \
     ".venv/bin/replicator drill; are the objectives met (with the broker running):" \
     "REPLICATOR_KAFKA_BOOTSTRAP_SERVERS=\$(cat $KAFKA_DIR/bootstrap) .venv/bin/replicator status" >&2
exit "${status:-0}"
