#!/usr/bin/env bash
# Local S3-compatible server (versitygw, built from the Go module proxy) for tests, benchmarks
# and trying the S3 store, without Docker.
#
# versitygw's posix backend serves a directory as S3: every sub-directory is a bucket, every
# file below it an object. It implements conditional writes (If-None-Match), Content-MD5
# checks and multipart uploads, which is what the S3 store relies on.
#
#   s3.sh fetch                       build the pinned versitygw into the cache (no-op when
#                                     already built)
#   s3.sh start --dir DIR [--port P]  start a server on 127.0.0.1 (free port unless P) with its
#                                     data in DIR/data; prints the endpoint http://127.0.0.1:P
#   s3.sh stop --dir DIR              stop it (idempotent)
#   s3.sh kill --dir DIR              SIGKILL it (tests: a server dying mid-upload)
#   s3.sh status --dir DIR            exit 0 and "running ENDPOINT" / exit 3 and "stopped"
#
# Credentials of the local server: access key "replicator", secret "replicator-secret" (a
# scratch server on loopback; export them as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).
#
# Environment knobs:
#   VERSITYGW_VERSION   module version to build (default v1.8.0)
#   VERSITYGW_BIN       use this binary instead of building one
#   REPLICATOR_CACHE    cache directory (default ~/.cache/replicator)
set -euo pipefail

VERSION="${VERSITYGW_VERSION:-v1.8.0}"
CACHE="${REPLICATOR_CACHE:-$HOME/.cache/replicator}"
BIN="${VERSITYGW_BIN:-$CACHE/versitygw-$VERSION/versitygw}"
ACCESS="replicator"
SECRET="replicator-secret"
START_TIMEOUT="${S3_START_TIMEOUT:-30}"

die() { echo "s3.sh: $*" >&2; exit 1; }

fetch() {
  [[ -x "$BIN" ]] && return 0
  command -v go >/dev/null || die "versitygw not built and no 'go' toolchain: install Go (>= 1.24) or set VERSITYGW_BIN"
  echo "s3.sh: building versitygw $VERSION from the Go module proxy (first time only, a few minutes)" >&2
  local out
  out="$(dirname "$BIN")"
  mkdir -p "$out"
  GOBIN="$out" GOFLAGS="${GOFLAGS:--buildvcs=false}" \
    go install "github.com/versity/versitygw/cmd/versitygw@$VERSION" >&2 \
    || die "go install github.com/versity/versitygw/cmd/versitygw@$VERSION failed"
  [[ -x "$BIN" ]] || die "versitygw built but $BIN is missing"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

pid_of() { [[ -f "$1/versitygw.pid" ]] && cat "$1/versitygw.pid"; }

alive() {
  local pid
  pid="$(pid_of "$1" 2>/dev/null || true)"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

start() {
  local dir="" port=""
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --dir) dir="$2"; shift 2 ;;
      --port) port="$2"; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
  [[ -n "$dir" ]] || die "start needs --dir"
  mkdir -p "$dir/data"
  dir="$(cd "$dir" && pwd -P)"
  if alive "$dir"; then echo "http://127.0.0.1:$(cat "$dir/port")"; return 0; fi
  fetch
  [[ -n "$port" ]] || port="$(free_port)"
  echo "$port" > "$dir/port"
  # no metadata sidecar needed: ext4/xfs keep user xattrs; fall back to a sidecar otherwise
  local meta=()
  if ! python3 -c 'import os,sys; os.setxattr(sys.argv[1], "user.replicator-probe", b"1")' "$dir/data" 2>/dev/null; then
    mkdir -p "$dir/meta"; meta=(--sidecar "$dir/meta")
  fi
  nohup "$BIN" --access "$ACCESS" --secret "$SECRET" --port "127.0.0.1:$port" \
    posix "${meta[@]}" "$dir/data" > "$dir/versitygw.log" 2>&1 &
  echo $! > "$dir/versitygw.pid"
  local waited=0
  until python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' "$port" 2>/dev/null; do
    alive "$dir" || { cat "$dir/versitygw.log" >&2; die "versitygw exited at start"; }
    sleep 0.2; waited=$((waited + 1))
    [[ $waited -lt $((START_TIMEOUT * 5)) ]] || die "versitygw not listening on 127.0.0.1:$port after ${START_TIMEOUT}s"
  done
  echo "http://127.0.0.1:$port"
}

stop() {
  local dir="$1" sig="${2:-TERM}" pid
  pid="$(pid_of "$dir" 2>/dev/null || true)"
  [[ -n "$pid" ]] || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$dir/versitygw.pid"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  fetch) fetch ;;
  start) start "$@" ;;
  stop|kill)
    [[ "${1:-}" == "--dir" && -n "${2:-}" ]] || die "$cmd needs --dir DIR"
    if [[ "$cmd" == kill ]]; then stop "$2" KILL; else stop "$2" TERM; fi ;;
  status)
    [[ "${1:-}" == "--dir" && -n "${2:-}" ]] || die "status needs --dir DIR"
    if alive "$2"; then echo "running http://127.0.0.1:$(cat "$2/port")"; else echo stopped; exit 3; fi ;;
  *) sed -n '2,24p' "$0"; exit 2 ;;
esac
