#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft, broker+controller in one JVM) without Docker.
#
# The official broker jars come from Maven Central (see pom.xml beside this file)
# and are copied into deploy/kafka/lib/. Everything a broker writes lives in --dir.
#
#   kafka.sh fetch                              fetch jars into lib/ (no-op when complete)
#   kafka.sh start --dir DIR [--port PORT]      configure + format + start; prints 127.0.0.1:PORT
#   kafka.sh start-existing --dir DIR           start again on the same ports/data, no format
#   kafka.sh restart --dir DIR                  stop (if running) + start-existing
#   kafka.sh stop --dir DIR                     SIGTERM, up to 20 s, then SIGKILL (idempotent)
#   kafka.sh status --dir DIR                   exit 0 and "running ..." / exit 3 and "stopped"
#   kafka.sh bootstrap --dir DIR                print 127.0.0.1:PORT of DIR's broker config
#   kafka.sh cds                                optional: build a class-data-sharing archive
#                                               (one training run, ~50 MB in lib/) that cuts
#                                               each later broker start's CPU time by ~1/3
#
# Environment knobs:
#   KAFKA_VERSION          Kafka version to fetch/run (default below)
#   KAFKA_LIB_DIR          where the jars go (default deploy/kafka/lib); use another
#                          dir to try another version without disturbing running brokers
#   KAFKA_HEAP_OPTS        JVM heap flags (default "-Xms128m -Xmx512m")
#   KAFKA_JVM_OPTS         extra JVM flags for the broker (default none)
#   KAFKA_CDS              0 = do not use the archive built by 'kafka.sh cds'
#   KAFKA_START_TIMEOUT    seconds to wait for readiness (default 60)
#   KAFKA_STOP_TIMEOUT     seconds between SIGTERM and SIGKILL (default 20)
#   KAFKA_SH_PYTHON        python3 used for port picking / readiness probe (stdlib only;
#                          default: <repo>/.venv/bin/python if present, else python3)
#   JAVA_HOME / JAVA       java to use (default: java on PATH)
#   MVN                    maven command (default: mvn)
set -euo pipefail

DEFAULT_KAFKA_VERSION="4.4.0"
KAFKA_VERSION="${KAFKA_VERSION:-$DEFAULT_KAFKA_VERSION}"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd -P)"
LIB_DIR="${KAFKA_LIB_DIR:-$SCRIPT_DIR/lib}"
STAMP="$LIB_DIR/.fetched"
CDS_ARCHIVE="$LIB_DIR/kafka-$KAFKA_VERSION.jsa"
POM="$SCRIPT_DIR/pom.xml"

START_TIMEOUT="${KAFKA_START_TIMEOUT:-60}"
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-20}"
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms128m -Xmx512m}"
MVN="${MVN:-mvn}"

if [[ -n "${JAVA:-}" ]]; then
  :
elif [[ -n "${JAVA_HOME:-}" && -x "${JAVA_HOME}/bin/java" ]]; then
  JAVA="${JAVA_HOME}/bin/java"
else
  JAVA="java"
fi

if [[ -n "${KAFKA_SH_PYTHON:-}" ]]; then
  PY="$KAFKA_SH_PYTHON"
elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
  PY="$REPO_ROOT/.venv/bin/python"
else
  PY="python3"
fi

die() { echo "kafka.sh: $*" >&2; exit 1; }
log() { echo "kafka.sh: $*" >&2; }

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# ---------------------------------------------------------------- fetch

# The stamp holds the version and the list of jars copied; lib/ is complete
# when the stamp names the wanted version and every listed jar is present.
lib_complete() {
  [[ -f "$STAMP" ]] || return 1
  local first
  first="$(head -n 1 "$STAMP")"
  [[ "$first" == "kafka_version=$KAFKA_VERSION" ]] || return 1
  [[ "$(sed -n 2p "$STAMP")" == "pom=$(pom_sum)" ]] || return 1
  [[ -f "$LIB_DIR/kafka_2.13-$KAFKA_VERSION.jar" ]] || return 1
  local jar n=0
  while IFS= read -r jar; do
    [[ "$jar" == *.jar ]] || continue
    [[ -s "$LIB_DIR/$jar" ]] || return 1
    n=$((n + 1))
  done < "$STAMP"
  [[ "$n" -gt 10 ]]
}

pom_sum() { cksum < "$POM" | tr -s ' ' '-'; }

do_fetch() {
  lib_complete && return 0
  command -v "$MVN" >/dev/null 2>&1 || die "maven ('$MVN') not found; needed to fetch the Kafka jars"
  mkdir -p "$LIB_DIR"
  # Serialise concurrent fetches (parallel test workers): the lock lives in lib/.
  exec 9> "$LIB_DIR/.fetch.lock"
  if command -v flock >/dev/null 2>&1; then
    flock 9
  fi
  if lib_complete; then exec 9>&-; return 0; fi
  log "fetching Apache Kafka $KAFKA_VERSION jars from Maven Central into $LIB_DIR"
  local t0=$SECONDS
  rm -f "$STAMP" "$LIB_DIR"/*.jar "$LIB_DIR"/*.jsa
  local mvn_log="$LIB_DIR/.mvn.log"
  if ! "$MVN" -q -B -f "$POM" \
        -Dkafka.version="$KAFKA_VERSION" \
        dependency:copy-dependencies \
        -DincludeScope=runtime \
        -DoutputDirectory="$LIB_DIR" > "$mvn_log" 2>&1; then
    tail -n 40 "$mvn_log" >&2 || true
    die "maven could not fetch org.apache.kafka:kafka_2.13:$KAFKA_VERSION (log: $mvn_log)"
  fi
  [[ -f "$LIB_DIR/kafka_2.13-$KAFKA_VERSION.jar" ]] \
    || die "maven finished but kafka_2.13-$KAFKA_VERSION.jar is not in $LIB_DIR"
  {
    echo "kafka_version=$KAFKA_VERSION"
    echo "pom=$(pom_sum)"
    (cd "$LIB_DIR" && ls -1 -- *.jar)
  } > "$STAMP.tmp"
  mv "$STAMP.tmp" "$STAMP"
  log "fetched $(grep -c '\.jar$' "$STAMP") jars ($(du -sh "$LIB_DIR" | cut -f1)) in $((SECONDS - t0))s"
  exec 9>&-
}

# ---------------------------------------------------------------- helpers

free_port() {
  "$PY" - "$@" <<'EOF'
import socket, sys
avoid = {int(a) for a in sys.argv[1:]}
for _ in range(50):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    if port not in avoid:
        print(port)
        sys.exit(0)
sys.exit("no free port found")
EOF
}

port_in_use() {  # true if something listens on 127.0.0.1:PORT (TIME_WAIT leftovers do not count)
  "$PY" - "$1" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(0)
finally:
    s.close()
sys.exit(1)
EOF
}

new_cluster_id() {
  # Kafka's Uuid text form: 16 random bytes, url-safe base64 without padding,
  # never starting with '-'.
  "$PY" - <<'EOF'
import base64, uuid
while True:
    s = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
    if not s.startswith("-"):
        print(s)
        break
EOF
}

# Readiness: "Kafka Server started" is in this run's server.log, and the broker
# answers FindCoordinator for a consumer group and for a transactional id with
# itself. That needs the broker registered with the controller and unfenced, and
# makes it create __consumer_offsets and __transaction_state now, so the first
# test's group join / InitProducerId does not hit COORDINATOR_NOT_AVAILABLE.
# Plain sockets only: any python3 works, no client library needed.
probe_ready() {
  local port="$1" server_log="$2"
  "$PY" - "$port" "$server_log" <<'EOF' >/dev/null 2>&1
import socket, struct, sys
port, server_log = int(sys.argv[1]), sys.argv[2]

def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf

def request(s: socket.socket, api_key: int, version: int, corr: int, body: bytes) -> bytes:
    cid = b"kafka.sh-probe"
    msg = struct.pack(">hhih", api_key, version, corr, len(cid)) + cid + body
    s.sendall(struct.pack(">i", len(msg)) + msg)
    (size,) = struct.unpack(">i", recv_exact(s, 4))
    data = recv_exact(s, size)
    (got,) = struct.unpack(">i", data[:4])
    if got != corr:
        raise ConnectionError("correlation id mismatch")
    return data[4:]

def kstr(v: str) -> bytes:
    b = v.encode()
    return struct.pack(">h", len(b)) + b

def coordinator_ok(s: socket.socket, corr: int, key: str, key_type: int) -> bool:
    # FindCoordinator v1 request: key string, key_type int8 (0 group, 1 transaction);
    # response: throttle_time_ms int32, error_code int16, ...
    r = request(s, 10, 1, corr, kstr(key) + struct.pack(">b", key_type))
    (err,) = struct.unpack(">h", r[4:6])
    return err == 0

with open(server_log, "rb") as f:
    if b"Kafka Server started" not in f.read():
        sys.exit(1)
with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
    r = request(s, 18, 0, 1, b"")  # ApiVersions v0: every broker version answers it
    if struct.unpack(">h", r[:2])[0] != 0:
        sys.exit(1)
    ok = coordinator_ok(s, 2, "kafka-sh-probe", 0) and coordinator_ok(s, 3, "kafka-sh-probe", 1)
sys.exit(0 if ok else 1)
EOF
}

read_prop() {  # read_prop FILE KEY
  local line
  line="$(grep -E "^$2=" "$1" | tail -n 1 || true)"
  echo "${line#*=}"
}

broker_port_of() {  # from DIR/server.properties
  local listeners
  listeners="$(read_prop "$1/server.properties" listeners)"
  listeners="${listeners#*PLAINTEXT://127.0.0.1:}"
  echo "${listeners%%,*}"
}

pid_alive() {  # pid_alive PID DIR -> our broker process for DIR is running
  local pid="$1" dir="$2" args
  [[ -n "$pid" ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  if [[ -r "/proc/$pid/cmdline" ]]; then
    args="$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null || true)"
  else
    args="$(ps -ww -o args= -p "$pid" 2>/dev/null || true)"
  fi
  [[ "$args" == *kafka.Kafka* && "$args" == *"$dir/server.properties"* ]]
}

proc_gone() {  # proc_gone PID -> no such process, or only a zombie left
  local stat
  kill -0 "$1" 2>/dev/null || return 0
  stat="$(ps -o stat= -p "$1" 2>/dev/null || true)"
  [[ -z "$stat" || "$stat" == Z* ]]
}

running_pid() {  # echoes the pid if DIR's broker runs, else nothing / return 1
  local dir="$1" pid
  [[ -f "$dir/kafka.pid" ]] || return 1
  pid="$(tr -dc '0-9' < "$dir/kafka.pid")"
  pid_alive "$pid" "$dir" || return 1
  echo "$pid"
}

# ---------------------------------------------------------------- config

write_config() {  # write_config DIR PORT CONTROLLER_PORT
  local dir="$1" port="$2" cport="$3"
  mkdir -p "$dir/data" "$dir/logs"
  cat > "$dir/server.properties" <<EOF
# Written by deploy/kafka/kafka.sh - single-node KRaft (combined broker+controller).
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data

num.partitions=3
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false
delete.topic.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=5
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=5
group.initial.rebalance.delay.ms=0

# small footprint for tests
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.segment.bytes=16777216
log.retention.hours=168
log.retention.check.interval.ms=60000
EOF
  cat > "$dir/log4j2.properties" <<EOF
# Written by deploy/kafka/kafka.sh - broker logs go to files, nothing to stdout.
status = warn
name = kafka-local
appender.server.type = RollingFile
appender.server.name = server
appender.server.fileName = $dir/logs/server.log
appender.server.filePattern = $dir/logs/server.log.%i
appender.server.layout.type = PatternLayout
appender.server.layout.pattern = [%d] %p %m (%c)%n
appender.server.policies.type = Policies
appender.server.policies.size.type = SizeBasedTriggeringPolicy
appender.server.policies.size.size = 20MB
appender.server.strategy.type = DefaultRolloverStrategy
appender.server.strategy.max = 3
appender.state.type = RollingFile
appender.state.name = state
appender.state.fileName = $dir/logs/state-change.log
appender.state.filePattern = $dir/logs/state-change.log.%i
appender.state.layout.type = PatternLayout
appender.state.layout.pattern = [%d] %p %m (%c)%n
appender.state.policies.type = Policies
appender.state.policies.size.type = SizeBasedTriggeringPolicy
appender.state.policies.size.size = 10MB
appender.state.strategy.type = DefaultRolloverStrategy
appender.state.strategy.max = 2
rootLogger.level = INFO
rootLogger.appenderRef.server.ref = server
logger.state.name = state.change.logger
logger.state.level = INFO
logger.state.additivity = false
logger.state.appenderRef.state.ref = state
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
EOF
  echo "127.0.0.1:$port" > "$dir/bootstrap"
}

format_storage() {  # format_storage DIR
  local dir="$1" cluster_id
  cluster_id="$(new_cluster_id)"
  # short-lived tool JVM: C1 only + serial GC start faster
  if ! "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
        -Dlog4j2.configurationFile="$dir/log4j2.properties" \
        -cp "$LIB_DIR/*" kafka.tools.StorageTool format \
        -t "$cluster_id" -c "$dir/server.properties" \
        > "$dir/logs/format.log" 2>&1; then
    cat "$dir/logs/format.log" >&2
    die "formatting storage in $dir/data failed"
  fi
}

launch() {  # launch DIR -> starts the JVM, waits for readiness, prints bootstrap
  local dir="$1" port pid t0 deadline
  port="$(broker_port_of "$dir")"
  [[ -n "$port" ]] || die "no PLAINTEXT listener in $dir/server.properties"
  if port_in_use "$port"; then
    die "port 127.0.0.1:$port is already in use (another broker or process?)"
  fi
  mkdir -p "$dir/logs"
  # readiness looks for this run's "Kafka Server started"; keep the last run's log aside
  if [[ -s "$dir/logs/server.log" ]]; then
    mv -f "$dir/logs/server.log" "$dir/logs/server.log.previous"
  fi
  t0=$SECONDS
  local cds_opts=""
  if [[ -n "${CDS_DUMP_TO:-}" ]]; then
    cds_opts="-XX:ArchiveClassesAtExit=$CDS_DUMP_TO"
  elif [[ "${KAFKA_CDS:-1}" != "0" && -s "$CDS_ARCHIVE" ]]; then
    # a stale or foreign archive is ignored by the JVM (a warning in kafkaServer.out)
    cds_opts="-XX:SharedArchiveFile=$CDS_ARCHIVE"
  fi
  # shellcheck disable=SC2086  # HEAP_OPTS / KAFKA_JVM_OPTS / cds_opts are lists of flags
  nohup "$JAVA" $HEAP_OPTS ${KAFKA_JVM_OPTS:-} $cds_opts \
    -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
    -Djava.awt.headless=true \
    -Dkafka.logs.dir="$dir/logs" \
    -Dlog4j2.configurationFile="$dir/log4j2.properties" \
    -cp "$LIB_DIR/*" kafka.Kafka "$dir/server.properties" \
    > "$dir/logs/kafkaServer.out" 2>&1 < /dev/null &
  pid=$!
  echo "$pid" > "$dir/kafka.pid"

  deadline=$((SECONDS + START_TIMEOUT))
  while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "broker process $pid exited during startup"
      dump_logs "$dir"
      rm -f "$dir/kafka.pid"
      die "Kafka broker in $dir failed to start"
    fi
    # cheap check first (no python while the JVM is busy starting up), then the probe
    if grep -q "Kafka Server started" "$dir/logs/server.log" 2>/dev/null \
        && probe_ready "$port" "$dir/logs/server.log"; then
      break
    fi
    if (( SECONDS >= deadline )); then
      log "broker not ready after ${START_TIMEOUT}s"
      dump_logs "$dir"
      do_stop "$dir" >/dev/null 2>&1 || true
      die "Kafka broker in $dir did not become ready within ${START_TIMEOUT}s"
    fi
    sleep 0.2
  done
  log "broker pid $pid ready on 127.0.0.1:$port after $((SECONDS - t0))s (logs: $dir/logs)"
  echo "127.0.0.1:$port"
}

dump_logs() {
  local dir="$1" f
  for f in "$dir/logs/kafkaServer.out" "$dir/logs/server.log"; do
    if [[ -s "$f" ]]; then
      echo "----- tail of $f -----" >&2
      tail -n 40 "$f" >&2
    fi
  done
}

# ---------------------------------------------------------------- commands

do_cds() {  # training run: start a throwaway broker, stop it, keep the class archive
  do_fetch
  if [[ -s "$CDS_ARCHIVE" ]]; then
    log "CDS archive already there: $CDS_ARCHIVE"
    return 0
  fi
  local tmp port cport
  tmp="$(mktemp -d "${TMPDIR:-/tmp}/kafka-cds.XXXXXX")"
  port="$(free_port)"
  cport="$(free_port "$port")"
  write_config "$tmp" "$port" "$cport"
  format_storage "$tmp"
  log "training run for the CDS archive (a broker in $tmp)"
  CDS_DUMP_TO="$tmp/kafka.jsa" launch "$tmp" > /dev/null
  # the archive is written while the JVM exits: give it time, never SIGKILL early
  STOP_TIMEOUT=300 do_stop "$tmp"
  if [[ ! -s "$tmp/kafka.jsa" ]]; then
    dump_logs "$tmp"
    rm -rf "$tmp"
    die "the JVM wrote no CDS archive"
  fi
  mv -f "$tmp/kafka.jsa" "$CDS_ARCHIVE.tmp.$$"
  mv -f "$CDS_ARCHIVE.tmp.$$" "$CDS_ARCHIVE"
  rm -rf "$tmp"
  log "CDS archive ready: $CDS_ARCHIVE ($(du -h "$CDS_ARCHIVE" | cut -f1))"
}

do_start() {  # do_start DIR PORT(optional)
  local dir="$1" port="${2:-}" pid cport existing
  if pid="$(running_pid "$dir")"; then
    existing="$(broker_port_of "$dir")"
    if [[ -n "$port" && "$port" != "$existing" ]]; then
      die "a broker (pid $pid) already runs in $dir on port $existing, not $port"
    fi
    log "broker already running in $dir (pid $pid)"
    echo "127.0.0.1:$existing"
    return 0
  fi
  do_fetch
  if [[ -f "$dir/data/meta.properties" && -f "$dir/server.properties" ]]; then
    # Already formatted: start on the data that is there, never re-format.
    existing="$(broker_port_of "$dir")"
    if [[ -n "$port" && "$port" != "$existing" ]]; then
      die "$dir holds a broker formatted for port $existing; use another --dir for port $port"
    fi
    launch "$dir"
    return 0
  fi
  mkdir -p "$dir"
  if [[ -z "$port" ]]; then
    port="$(free_port)"
  elif port_in_use "$port"; then
    die "port 127.0.0.1:$port is already in use"
  fi
  cport="$(free_port "$port")"
  write_config "$dir" "$port" "$cport"
  format_storage "$dir"
  launch "$dir"
}

do_start_existing() {
  local dir="$1" pid
  [[ -f "$dir/server.properties" && -f "$dir/data/meta.properties" ]] \
    || die "$dir has no formatted broker (run 'kafka.sh start --dir $dir' first)"
  if pid="$(running_pid "$dir")"; then
    log "broker already running in $dir (pid $pid)"
    echo "127.0.0.1:$(broker_port_of "$dir")"
    return 0
  fi
  do_fetch
  launch "$dir"
}

do_stop() {
  local dir="$1" pid waited=0
  if ! pid="$(running_pid "$dir")"; then
    rm -f "$dir/kafka.pid"
    log "no broker running in $dir"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  # pid_alive (not kill -0) so a zombie left for a slow reaper counts as gone
  while pid_alive "$pid" "$dir"; do
    if (( waited >= STOP_TIMEOUT * 10 )); then
      log "broker pid $pid still alive after ${STOP_TIMEOUT}s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  # The JVM may still be tearing down (its command line vanishes before its
  # sockets close); wait until it is gone or a zombie awaiting its reaper.
  waited=0
  while ! proc_gone "$pid" && (( waited < 50 )); do
    sleep 0.1
    waited=$((waited + 1))
  done
  rm -f "$dir/kafka.pid"
  log "broker pid $pid stopped"
}

do_status() {
  local dir="$1" pid
  if pid="$(running_pid "$dir")"; then
    echo "running pid=$pid bootstrap=127.0.0.1:$(broker_port_of "$dir")"
    return 0
  fi
  echo "stopped"
  return 3
}

# ---------------------------------------------------------------- main

abs_dir() {  # absolute, symlink-free path; the dir need not exist yet
  local d="$1"
  if [[ -d "$d" ]]; then
    (cd "$d" && pwd -P)
  else
    local parent
    parent="$(dirname "$d")"
    mkdir -p "$parent"
    echo "$(cd "$parent" && pwd -P)/$(basename "$d")"
  fi
}

cmd="${1:-}"
[[ -n "$cmd" ]] || usage
shift

DIR=""
PORT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) [[ $# -ge 2 ]] || die "--dir needs a value"; DIR="$2"; shift 2 ;;
    --dir=*) DIR="${1#--dir=}"; shift ;;
    --port) [[ $# -ge 2 ]] || die "--port needs a value"; PORT="$2"; shift 2 ;;
    --port=*) PORT="${1#--port=}"; shift ;;
    -h|--help) usage ;;
    *) die "unknown argument: $1" ;;
  esac
done
if [[ -n "$PORT" && ! "$PORT" =~ ^[0-9]+$ ]]; then
  die "--port must be a number, got '$PORT'"
fi

need_dir() {
  [[ -n "$DIR" ]] || die "$cmd needs --dir DIR"
  DIR="$(abs_dir "$DIR")"
}

case "$cmd" in
  fetch) do_fetch; log "jars for Kafka $KAFKA_VERSION are in $LIB_DIR" ;;
  cds) do_cds ;;
  start) need_dir; do_start "$DIR" "$PORT" ;;
  start-existing) need_dir; do_start_existing "$DIR" ;;
  restart) need_dir; do_stop "$DIR"; do_start_existing "$DIR" ;;
  stop) need_dir; do_stop "$DIR" ;;
  status) need_dir; do_status "$DIR" ;;
  bootstrap)
    need_dir
    [[ -f "$DIR/server.properties" ]] || die "no broker configured in $DIR"
    echo "127.0.0.1:$(broker_port_of "$DIR")"
    ;;
  -h|--help|help) usage ;;
  *) die "unknown command: $cmd (fetch|start|start-existing|restart|stop|status|bootstrap|cds)" ;;
esac
