#!/usr/bin/env bash
# The same load against ferrocotta, a 3-member etcd cluster and Redis (twice: without persistence,
# and with an fsync of every write), measured by one load generator (ferrocotta::loadgen) and
# printed side by side. See benches/peers/README.md for the knobs.
#
# Everything runs on 127.0.0.1 on free ports, in a temporary folder; on exit (also on failure or
# Ctrl-C) every process this script started is stopped by pid and the folder is removed.
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=$(pwd)

DURATION=${PEERS_DURATION:-10s}
WARMUP=${PEERS_WARMUP:-2s}
WORKLOADS=${PEERS_WORKLOADS:-"put:1 put:64 put:256 get:1 get:64 get:256 cas:64 ycsb-a:64 session:64 session:256"}
# `none`: only the redis-benchmark runs.
[[ $WORKLOADS == none ]] && WORKLOADS=
SYSTEMS=${PEERS_SYSTEMS:-"ferrocotta etcd redis redis-aof"}
CONNECTIONS=${PEERS_CONNECTIONS:-1}
KEYS=${PEERS_KEYS:-10000}
VALUE_SIZE=${PEERS_VALUE_SIZE:-}
SEED=${PEERS_SEED:-1}
RESULTS_DIR=${PEERS_RESULTS_DIR:-$ROOT/target/bench-peers}
BUILD=${PEERS_BUILD:-1}
# redis-benchmark against Redis, Redis with appendfsync always and ferrocotta's Redis-protocol
# port, after the load generator's runs: SET and GET with this many clients, at each pipeline
# depth, this many requests per test (0 requests: skip).
RB_REQUESTS=${PEERS_RB_REQUESTS:-100000}
RB_CLIENTS=${PEERS_RB_CLIENTS:-50}
RB_PIPELINES=${PEERS_RB_PIPELINES:-"1 16"}

# Bounds of the waits (seconds). A run may take its warm-up and measured period plus this for
# connecting and preloading the keys before `timeout` ends it.
RUN_SLACK_S=120
READY_WAIT_S=90
# ferrocotta up gives its servers 10 s between SIGTERM and SIGKILL; wait a little longer.
STOP_WAIT_S=15

# cargo puts binaries under CARGO_TARGET_DIR when it is set.
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
FC=$TARGET_DIR/release/ferrocotta
PEERS=$TARGET_DIR/release/ferrocotta-peers

log() { printf '[peers %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "error: $*"
    exit 2
}

REPORT=$ROOT/benches/peers/report.py
command -v python3 >/dev/null || die "python3 is missing: apt-get update && apt-get install -y python3"
secs() { python3 "$REPORT" secs "$1"; }

for sys in $SYSTEMS; do
    case $sys in ferrocotta | etcd | redis | redis-aof) ;; *) die "PEERS_SYSTEMS: unknown system $sys" ;; esac
done
[[ $RB_REQUESTS =~ ^[0-9]+$ && $RB_CLIENTS =~ ^[1-9][0-9]*$ ]] ||
    die "PEERS_RB_REQUESTS and PEERS_RB_CLIENTS must be numbers (clients at least 1)"
for p in $RB_PIPELINES; do [[ $p =~ ^[1-9][0-9]*$ ]] || die "PEERS_RB_PIPELINES: $p is not a pipeline depth"; done
for spec in $WORKLOADS; do
    [[ $spec =~ ^(put|get|get-eventual|cas|ycsb-a|session):[0-9]+$ ]] ||
        die "PEERS_WORKLOADS: $spec is not WORKLOAD:CONCURRENCY (put, get, get-eventual, cas, ycsb-a, session)"
done
duration_s=$(secs "$DURATION") || die "PEERS_DURATION: not a duration"
warmup_s=$(secs "$WARMUP") || die "PEERS_WARMUP: not a duration"
RUN_BOUND_S=$((duration_s + warmup_s + RUN_SLACK_S))
wants() { [[ " $SYSTEMS " == *" $1 "* ]]; }

# --- prerequisites -------------------------------------------------------------------------------
missing=()
if wants etcd; then command -v etcd >/dev/null || missing+=(etcd-server); fi
if wants redis || wants redis-aof; then command -v redis-server >/dev/null || missing+=(redis-server); fi
if ((RB_REQUESTS > 0)); then command -v redis-benchmark >/dev/null || missing+=(redis-tools); fi
# etcd-client's build script runs protoc.
if [[ $BUILD == 1 ]]; then command -v protoc >/dev/null || missing+=(protobuf-compiler); fi
if ((${#missing[@]})); then
    echo "missing: ${missing[*]}; install with:" >&2
    echo "  apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 2
fi

# --- cleanup: every process by pid, then the folder ----------------------------------------------
TMP=$(mktemp -d /tmp/ferrocotta-peers.XXXXXX)
mkdir -p "$TMP/logs" "$RESULTS_DIR"
SERVER_PIDS=() # started by this script: etcd members, Redis servers, ferrocotta up
CLIENT_PID=    # the bench client of the run in progress (`timeout` around it)
STAMP=$(date +%Y%m%d-%H%M%S)
RESULTS_TXT=$RESULTS_DIR/peers-$STAMP.txt
RESULTS_JSONL=$RESULTS_DIR/peers-$STAMP.jsonl

# Every server runs in a folder under $TMP: each is started there (Redis then changes into its
# --dir, also under $TMP) and `ferrocotta up`'s array servers and node inherit its folder. So the
# processes whose working folder is under $TMP are exactly the ones this script started, directly
# or through `ferrocotta up`, and a pid reused meanwhile by another process is never signalled.
ours() {
    local cwd
    cwd=$(readlink "/proc/$1/cwd" 2>/dev/null) || return 1
    [[ $cwd == "$TMP" || $cwd == "$TMP"/* ]]
}

# The pids of all our processes still running, including those `ferrocotta up` started (it stops
# them on SIGTERM, but not if it died or was still starting them).
our_pids() {
    find /proc -mindepth 2 -maxdepth 2 -name cwd \( -lname "$TMP" -o -lname "$TMP/*" \) 2>/dev/null | cut -d/ -f3
}

# Waits up to $1 seconds for our processes to end; true if they all did.
wait_ours_gone() {
    local deadline=$((SECONDS + $1))
    while [[ -n $(our_pids) ]]; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

stop_everything() {
    local pid
    if [[ -n $CLIENT_PID ]] && kill -0 "$CLIENT_PID" 2>/dev/null; then
        kill -TERM "$CLIENT_PID" 2>/dev/null
    fi
    # SIGTERM to what the script started; `ferrocotta up` stops its servers in order.
    for pid in "${SERVER_PIDS[@]}"; do
        if ours "$pid"; then kill -TERM "$pid" 2>/dev/null; fi
    done
    wait_ours_gone "$STOP_WAIT_S" && return
    for pid in $(our_pids); do
        log "stopping $pid ($(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-80)), still running"
        kill -TERM "$pid" 2>/dev/null
    done
    wait_ours_gone 3 && return
    for pid in $(our_pids); do
        log "killing $pid"
        kill -KILL "$pid" 2>/dev/null
    done
    wait_ours_gone 3 || log "some processes did not end: $(our_pids | tr '\n' ' ')"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    log "stopping everything this script started"
    stop_everything
    if [[ -n $CLIENT_PID ]] && kill -0 "$CLIENT_PID" 2>/dev/null; then
        kill -KILL "$CLIENT_PID" 2>/dev/null
    fi
    if ((rc != 0)); then
        # Keep the servers' logs of a failed run; the temporary folder goes.
        local keep=$RESULTS_DIR/peers-$STAMP-logs
        mkdir -p "$keep"
        cp -r "$TMP/logs/." "$keep/" 2>/dev/null
        [[ -d $TMP/fc/logs ]] && cp -r "$TMP/fc/logs" "$keep/ferrocotta" 2>/dev/null
        log "failed (exit $rc); logs kept in $keep"
    fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- build ---------------------------------------------------------------------------------------
if [[ $BUILD == 1 ]]; then
    log "cargo build --release --workspace"
    cargo build --release --workspace
fi
[[ -x $FC && -x $PEERS ]] || die "no release binaries in target/release; run: cargo build --release --workspace"

# --- ports ---------------------------------------------------------------------------------------
# Free ports from the kernel, all held until every one is chosen so none is handed out twice.
read -r -a PORTS <<<"$(python3 "$REPORT" ports 8)"
ETCD_CLIENT_PORTS=("${PORTS[@]:0:3}")
ETCD_PEER_PORTS=("${PORTS[@]:3:3}")
REDIS_PORT=${PORTS[6]}
REDIS_AOF_PORT=${PORTS[7]}

# --- start the systems ---------------------------------------------------------------------------
ETCD_ENDPOINTS=
if wants etcd; then
    cluster=
    for i in 0 1 2; do
        cluster+="${cluster:+,}e$((i + 1))=http://127.0.0.1:${ETCD_PEER_PORTS[i]}"
        ETCD_ENDPOINTS+="${ETCD_ENDPOINTS:+,}127.0.0.1:${ETCD_CLIENT_PORTS[i]}"
    done
    for i in 0 1 2; do
        name=e$((i + 1))
        mkdir -p "$TMP/etcd/$name"
        # etcd 3.4 flags; the defaults otherwise (fsync of the WAL on every commit, snapshots
        # every 100k entries, 128 operations per transaction at most).
        (cd "$TMP/etcd/$name" && exec etcd --name "$name" --data-dir "$TMP/etcd/$name/data" \
            --listen-client-urls "http://127.0.0.1:${ETCD_CLIENT_PORTS[i]}" \
            --advertise-client-urls "http://127.0.0.1:${ETCD_CLIENT_PORTS[i]}" \
            --listen-peer-urls "http://127.0.0.1:${ETCD_PEER_PORTS[i]}" \
            --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER_PORTS[i]}" \
            --initial-cluster "$cluster" --initial-cluster-state new \
            --initial-cluster-token ferrocotta-peers --logger zap --log-outputs stderr) \
            >"$TMP/logs/etcd-$name.log" 2>&1 &
        SERVER_PIDS+=($!)
    done
    log "etcd: 3 members, clients at $ETCD_ENDPOINTS"
fi

start_redis() { # name port extra-flags...
    local name=$1 port=$2
    shift 2
    mkdir -p "$TMP/$name"
    (cd "$TMP/$name" && exec redis-server --bind 127.0.0.1 --port "$port" --dir "$TMP/$name" \
        --daemonize no --save "" "$@") >"$TMP/logs/$name.log" 2>&1 &
    SERVER_PIDS+=($!)
    log "$name: 127.0.0.1:$port ($*)"
}
wants redis && start_redis redis "$REDIS_PORT" --appendonly no
wants redis-aof && start_redis redis-aof "$REDIS_AOF_PORT" --appendonly yes --appendfsync always

ARRAY_URLS= SECRET_FILE= NODE=
if wants ferrocotta; then
    # One stripe of three array servers (a replicated array, as etcd's three members) and one
    # integration node for the session workload.
    (cd "$TMP" && exec "$FC" up --base-port 0 --dir "$TMP/fc" --nodes 1) >"$TMP/logs/ferrocotta-up.log" 2>&1 &
    fc_up=$!
    SERVER_PIDS+=("$fc_up")
    deadline=$((SECONDS + READY_WAIT_S))
    # `ferrocotta up` writes endpoints.json once every stripe has an active and the node's admin
    # port listens (written in place, not renamed: read until it parses).
    until facts=$(python3 "$REPORT" endpoints "$TMP/fc/endpoints.json" 2>/dev/null); do
        kill -0 "$fc_up" 2>/dev/null || die "ferrocotta up exited before it was ready (its log is kept, see below)"
        ((SECONDS < deadline)) || die "ferrocotta up was not ready within ${READY_WAIT_S}s"
        sleep 0.2
    done
    read -r ARRAY_URLS SECRET_FILE NODE <<<"$facts"
    RESP_ADDRS=$(python3 "$REPORT" resp "$TMP/fc/endpoints.json") || die "ferrocotta up opened no Redis-protocol port"
    [[ $NODE != - ]] || die "ferrocotta up started no integration node"
    host=${NODE%:*} port=${NODE##*:}
    until (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; do
        ((SECONDS < deadline)) || die "the integration node at $NODE did not serve within ${READY_WAIT_S}s"
        sleep 0.2
    done
    log "ferrocotta: array at $ARRAY_URLS, node at $NODE"
fi

ping_peer() { # kind endpoints
    "$PEERS" ping --target "$1" --endpoints "$2" --timeout 2s --wait "${READY_WAIT_S}s" >/dev/null ||
        die "$1 at $2 did not answer within ${READY_WAIT_S}s (the logs are kept, see below)"
}
wants etcd && ping_peer etcd "$ETCD_ENDPOINTS"
wants redis && ping_peer redis "127.0.0.1:$REDIS_PORT"
wants redis-aof && ping_peer redis "127.0.0.1:$REDIS_AOF_PORT"
log "all systems answer"

# --- the runs ------------------------------------------------------------------------------------
{
    echo "# ferrocotta vs peers, $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+dirty')"
    echo "# machine: $(nproc) cores, $(uname -r); $(etcd --version 2>/dev/null | head -1); $(redis-server --version 2>/dev/null | cut -d' ' -f1-3)"
    echo "# duration $DURATION, warm-up $WARMUP, keys $KEYS, connections $CONNECTIONS, value size ${VALUE_SIZE:-default (100 B; 1 KiB for ycsb-a)}, seed $SEED"
    echo "# ferrocotta: 1 stripe x 3 servers + 1 integration node; etcd: 3 members; redis: 1 server, no persistence; redis-aof: 1 server, appendfsync always"
} >"$RESULTS_TXT"
: >"$RESULTS_JSONL"

# One run: the client's JSON (or the failure) becomes one line of $RESULTS_JSONL.
run_one() { # system workload concurrency
    local sys=$1 workload=$2 conc=$3 rc=0
    local common=(--concurrency "$conc" --connections "$CONNECTIONS" --duration "$DURATION" --warmup "$WARMUP"
        --keys "$KEYS" --seed "$SEED" --json)
    [[ -n $VALUE_SIZE ]] && common+=(--value-size "$VALUE_SIZE")
    local cmd
    case $sys in
    ferrocotta)
        cmd=("$FC" bench --array-urls "$ARRAY_URLS" --secret-file "$SECRET_FILE")
        case $workload in
        get-eventual) cmd+=(--workload get --eventual) ;;
        session) cmd+=(--workload session --node-urls "$NODE") ;;
        *) cmd+=(--workload "$workload") ;;
        esac
        ;;
    etcd) cmd=("$PEERS" run --target etcd --endpoints "$ETCD_ENDPOINTS" --workload "$workload") ;;
    redis) cmd=("$PEERS" run --target redis --endpoints "127.0.0.1:$REDIS_PORT" --workload "$workload") ;;
    redis-aof)
        cmd=("$PEERS" run --target redis --endpoints "127.0.0.1:$REDIS_AOF_PORT" --label redis-aof
            --workload "$workload")
        ;;
    esac
    # In the background and waited for, so Ctrl-C reaches the trap at once (bash defers traps
    # while a foreground command runs); `timeout` bounds a run that hangs.
    timeout -k 10 "$RUN_BOUND_S" "${cmd[@]}" "${common[@]}" >"$TMP/run.out" 2>"$TMP/run.err" &
    CLIENT_PID=$!
    if wait "$CLIENT_PID"; then rc=0; else rc=$?; fi
    CLIENT_PID=
    python3 "$REPORT" record "$sys" "$workload" "$conc" "$rc" "$TMP/run.out" "$TMP/run.err" >>"$RESULTS_JSONL"
}

runs=$(($(wc -w <<<"$WORKLOADS") * $(wc -w <<<"$SYSTEMS")))
log "$runs runs of ${DURATION} (+${WARMUP} warm-up) each"
for spec in $WORKLOADS; do
    for sys in $SYSTEMS; do
        run_one "$sys" "${spec%%:*}" "${spec##*:}"
    done
done

# --- redis-benchmark -----------------------------------------------------------------------------
# The same redis-benchmark against each Redis and ferrocotta's Redis-protocol port: the port of the
# stripe's active, which holds every slot of the one stripe (redis-benchmark --cluster wants three
# masters or more). Its own figures: requests per second over the whole run, latency percentiles;
# an error answered by a server ends its run.
RB_JSONL=$RESULTS_DIR/peers-$STAMP-redis-benchmark.jsonl
: >"$RB_JSONL"
if ((RB_REQUESTS > 0)) && wants ferrocotta; then
    RESP_ADDR=
    for addr in $RESP_ADDRS; do
        if redis-cli -h "${addr%:*}" -p "${addr##*:}" -a "$(cat "$SECRET_FILE")" --no-auth-warning \
            info replication 2>/dev/null | grep -q '^role:master'; then
            RESP_ADDR=$addr
        fi
    done
    [[ -n $RESP_ADDR ]] || die "no Redis-protocol port of ferrocotta says role:master ($RESP_ADDRS)"
    log "ferrocotta: the active's Redis-protocol port is $RESP_ADDR"
fi
if ((RB_REQUESTS > 0)); then
    log "redis-benchmark: SET and GET, $RB_CLIENTS clients, pipelines $RB_PIPELINES, $RB_REQUESTS requests each"
    for pipeline in $RB_PIPELINES; do
        for sys in $SYSTEMS; do
            case $sys in
            redis) target=(-h 127.0.0.1 -p "$REDIS_PORT") ;;
            redis-aof) target=(-h 127.0.0.1 -p "$REDIS_AOF_PORT") ;;
            ferrocotta) target=(-h "${RESP_ADDR%:*}" -p "${RESP_ADDR##*:}" -a "$(cat "$SECRET_FILE")") ;;
            *) continue ;;
            esac
            rc=0
            timeout -k 10 "$RUN_BOUND_S" redis-benchmark "${target[@]}" -t set,get -c "$RB_CLIENTS" \
                -P "$pipeline" -n "$RB_REQUESTS" -r "$KEYS" -d 100 --csv \
                >"$TMP/rb.out" 2>"$TMP/rb.err" &
            CLIENT_PID=$!
            if wait "$CLIENT_PID"; then rc=0; else rc=$?; fi
            CLIENT_PID=
            python3 "$REPORT" rb_record "$sys" "$pipeline" "$RB_CLIENTS" "$rc" "$TMP/rb.out" "$TMP/rb.err" >>"$RB_JSONL"
        done
    done
fi

# --- the table -----------------------------------------------------------------------------------
: >"$TMP/table.txt"
if [[ -s $RESULTS_JSONL ]]; then
    python3 "$REPORT" table "$RESULTS_JSONL" "$SYSTEMS" >"$TMP/table.txt"
fi
if [[ -s $RB_JSONL ]]; then
    {
        echo
        echo "# redis-benchmark -t set,get -c $RB_CLIENTS -n $RB_REQUESTS -r $KEYS -d 100 (ferrocotta: the Redis-protocol port of its stripe's active)"
        python3 "$REPORT" table "$RB_JSONL" "$SYSTEMS"
    } >>"$TMP/table.txt"
fi
{
    echo
    cat "$TMP/table.txt"
    echo
    echo "# raw results, one JSON object per run (also in $RESULTS_JSONL):"
    cat "$RESULTS_JSONL"
} >>"$RESULTS_TXT"
echo
cat "$TMP/table.txt"
echo
echo "results: $RESULTS_TXT"
echo "raw JSON lines: $RESULTS_JSONL"
