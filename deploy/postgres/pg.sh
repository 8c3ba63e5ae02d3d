#!/usr/bin/env bash
# Local PostgreSQL (the Debian package) for tests, benchmarks and `make run`, without Docker.
#
# A private cluster: its own data directory, listening on 127.0.0.1 only, on a free port,
# unix socket inside the data directory. Nothing touches the system's default cluster.
#
#   pg.sh install                     install the Debian package if no server binaries exist
#                                     (needs root and apt-get; no-op when installed)
#   pg.sh start --dir DIR [--port P]  install if needed, initdb DIR (first time), start;
#                                     prints the DSN postgresql://replicator@127.0.0.1:P/postgres
#   pg.sh stop --dir DIR              fast shutdown (idempotent)
#   pg.sh status --dir DIR            exit 0 and "running DSN" / exit 3 and "stopped"
#   pg.sh dsn --dir DIR               print the DSN of DIR's cluster
#
# Authentication: `trust` for the superuser `replicator` on 127.0.0.1 only -- a scratch cluster
# for tests. Never point production at it.
#
# Environment knobs:
#   PG_BINDIR        server binaries (default: newest /usr/lib/postgresql/*/bin, else PATH)
#   PG_START_TIMEOUT seconds to wait for readiness (default 60)
#   PG_SH_PYTHON     python3 used to pick a free port (stdlib only)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd -P)"
START_TIMEOUT="${PG_START_TIMEOUT:-60}"
if [[ -n "${PG_SH_PYTHON:-}" ]]; then
  PY="$PG_SH_PYTHON"
elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
  PY="$REPO_ROOT/.venv/bin/python"
else
  PY="python3"
fi

die() { echo "pg.sh: $*" >&2; exit 1; }

find_bindir() {
  if [[ -n "${PG_BINDIR:-}" ]]; then echo "$PG_BINDIR"; return 0; fi
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  if [[ -n "$d" && -x "$d/initdb" ]]; then echo "$d"; return 0; fi
  if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return 0; fi
  return 1
}

install_pkg() {
  if find_bindir >/dev/null; then return 0; fi
  [[ "$(id -u)" == 0 ]] || die "PostgreSQL server binaries not found and not root: install the 'postgresql' package (apt-get install postgresql) or set PG_BINDIR"
  command -v apt-get >/dev/null || die "PostgreSQL server binaries not found and no apt-get: install PostgreSQL or set PG_BINDIR"
  echo "pg.sh: installing the Debian 'postgresql' package" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2 \
    || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2; } \
    || die "apt-get install postgresql failed"
  find_bindir >/dev/null || die "postgresql installed but no initdb found"
}

# As root, the server must run as an unprivileged user (postgres refuses root).
as_owner() {
  if [[ "$(id -u)" == 0 ]]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

free_port() {
  "$PY" - <<'EOF'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
EOF
}

dsn_of() {
  local dir="$1" port
  port="$(cat "$dir/port" 2>/dev/null)" || die "no cluster in $dir (run start first)"
  echo "postgresql://replicator@127.0.0.1:$port/postgres"
}

cmd_start() {
  local dir="" port=""
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --dir) dir="$2"; shift 2 ;;
      --port) port="$2"; shift 2 ;;
      *) die "start: unknown argument $1" ;;
    esac
  done
  [[ -n "$dir" ]] || die "start needs --dir DIR"
  install_pkg
  local bindir
  bindir="$(find_bindir)"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd -P)"
  if [[ "$(id -u)" == 0 ]]; then
    as_owner true
    chown postgres: "$dir"
    # the path to DIR must be traversable by the server's user
    local p="$dir"
    while [[ "$p" != "/" ]]; do p="$(dirname "$p")"; chmod o+x "$p" 2>/dev/null || true; done
  fi
  if [[ ! -f "$dir/data/PG_VERSION" ]]; then
    as_owner "$bindir/initdb" -D "$dir/data" -U replicator --auth=trust -E UTF8 \
      --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
    [[ -n "$port" ]] || port="$(free_port)"
    echo "$port" >"$dir/port"
    cat >>"$dir/data/postgresql.conf" <<EOF
# pg.sh: a private scratch cluster on loopback
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir/data'
max_connections = 50
shared_buffers = 256MB
fsync = on
synchronous_commit = on
logging_collector = off
EOF
  elif [[ -n "$port" ]]; then
    [[ "$port" == "$(cat "$dir/port")" ]] || die "$dir already configured for port $(cat "$dir/port")"
  fi
  if as_owner "$bindir/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    dsn_of "$dir"; return 0
  fi
  as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t "$START_TIMEOUT" start >/dev/null \
    || { tail -n 30 "$dir/server.log" >&2 || true; die "PostgreSQL did not start (log: $dir/server.log)"; }
  dsn_of "$dir"
}

cmd_stop() {
  local dir=""
  [[ "${1:-}" == "--dir" ]] && dir="${2:-}"
  [[ -n "$dir" ]] || die "stop needs --dir DIR"
  [[ -f "$dir/data/PG_VERSION" ]] || return 0
  local bindir
  bindir="$(find_bindir)" || return 0
  if as_owner "$bindir/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    as_owner "$bindir/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null
  fi
}

cmd_status() {
  local dir=""
  [[ "${1:-}" == "--dir" ]] && dir="${2:-}"
  [[ -n "$dir" ]] || die "status needs --dir DIR"
  local bindir
  if [[ -f "$dir/data/PG_VERSION" ]] && bindir="$(find_bindir)" \
     && as_owner "$bindir/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    echo "running $(dsn_of "$dir")"; return 0
  fi
  echo "stopped"; return 3
}

case "${1:-}" in
  install) install_pkg ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  status) shift; cmd_status "$@" ;;
  dsn) shift; [[ "${1:-}" == "--dir" ]] || die "dsn needs --dir DIR"; dsn_of "$2" ;;
  *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
