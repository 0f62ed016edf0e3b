#!/usr/bin/env bash
# A local cluster for load runs: N `chorus serve` processes on their own loopback
# addresses (by default 127.0.0.11, .12, …; HTTP 7070, QUIC 7071, cluster 7072 on each).
# $CHORUS_BENCH_NET sets the first three parts of the addresses (default 127.0.0) and
# $CHORUS_BENCH_BASE the last part of the first one minus one (default 10), so two
# clusters can run side by side: CHORUS_BENCH_BASE=20 CHORUS_BENCH_DIR=/tmp/b2 ….
#
#   benches/cluster.sh start [N] [extra serve flags…]   # default 3 nodes; waits until up
#   benches/cluster.sh urls ws|quic                     # --url flags for chorus loadgen
#   benches/cluster.sh stop
#
# Data, logs and the shared CA live under $CHORUS_BENCH_DIR (default /tmp/chorus-bench),
# wiped on start. The binary is $CHORUS_BIN (default target/release/chorus).
set -euo pipefail

DIR=${CHORUS_BENCH_DIR:-/tmp/chorus-bench}
BIN=${CHORUS_BIN:-target/release/chorus}
# Every node lets a connection send fast: the load generator measures the server, not the
# per-connection request limit.
UNTHROTTLED=(--requests-per-sec 100000 --requests-burst 100000)

NET=${CHORUS_BENCH_NET:-127.0.0}
BASE=${CHORUS_BENCH_BASE:-10}
if ! [[ $BASE =~ ^[0-9]+$ ]] || [ "$BASE" -gt 240 ]; then
    echo "CHORUS_BENCH_BASE must be 0-240" >&2
    exit 2
fi

ip_of() { echo "$NET.$((BASE + $1))"; }

start() {
    local n=${1:-3}
    shift || true
    [ -x "$BIN" ] || { echo "no $BIN: cargo build --release" >&2; exit 1; }
    stop 2>/dev/null || true
    rm -rf "$DIR"
    mkdir -p "$DIR"
    echo "$n" >"$DIR/nodes"
    local i ip
    for i in $(seq 1 "$n"); do
        ip=$(ip_of "$i")
        local join=()
        [ "$i" -gt 1 ] && join=(--join "$(ip_of 1):7072")
        CHORUS_LOG=${CHORUS_LOG:-warn} "$BIN" serve --data-dir "$DIR/n$i" --ca "$DIR/ca" \
            --node-name "n$i" --http-addr "$ip:7070" --quic-addr "$ip:7071" \
            --cluster-addr "$ip:7072" "${join[@]}" "${UNTHROTTLED[@]}" "$@" \
            >"$DIR/n$i.log" 2>&1 &
        echo $! >"$DIR/n$i.pid"
        # Let each node come up before the next joins through the first.
        wait_http "$ip" 30
    done
    local deadline=$((SECONDS + 60))
    until [ "$(curl -s -H 'authorization: Bearer chorus-dev-admin' \
        "http://$(ip_of 1):7070/admin/status" | grep -o '"state":"up"' | wc -l)" -ge "$n" ]; do
        [ $SECONDS -lt $deadline ] || { echo "cluster did not converge" >&2; exit 1; }
        sleep 0.2
    done
    echo "cluster of $n up under $DIR (CA $DIR/ca/ca.pem)"
}

wait_http() {
    local deadline=$((SECONDS + $2))
    until curl -sf "http://$1:7070/healthz" >/dev/null; do
        [ $SECONDS -lt $deadline ] || { echo "node at $1 did not start" >&2; exit 1; }
        sleep 0.1
    done
}

urls() {
    local n i
    n=$(cat "$DIR/nodes")
    for i in $(seq 1 "$n"); do
        case ${1:-ws} in
            ws) printf -- '--url ws://%s:7070/ws ' "$(ip_of "$i")" ;;
            quic) printf -- '--url quic://%s:7071 ' "$(ip_of "$i")" ;;
        esac
    done
    echo
}

stop() {
    local file pids=()
    for file in "$DIR"/n*.pid; do
        [ -e "$file" ] || continue
        pids+=("$(cat "$file")")
        rm -f "$file"
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    # SIGTERM drains a node; the last ones cannot hand their rooms on, so give it 30 s.
    kill "${pids[@]}" 2>/dev/null || true
    local deadline=$((SECONDS + 30))
    while kill -0 "${pids[@]}" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    kill -9 "${pids[@]}" 2>/dev/null || true
}

case ${1:-} in
    start) shift; start "$@" ;;
    urls) shift; urls "$@" ;;
    stop) stop ;;
    *) sed -n '2,10p' "$0"; exit 2 ;;
esac
