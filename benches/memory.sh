#!/usr/bin/env bash
# Memory per idle connection: for each count N, a fresh `chorus serve` and one
# `chorus loadgen` run with N listeners (each its own user, authenticated, in one room) and
# one sender at one comment per second. Prints the node's RSS before the connections and
# with them (a few seconds after the last listener joined), the RSS per connection, and
# the slope between the two counts: what one more connection costs, without the node's
# fixed overhead.
#
#   benches/memory.sh [ws|quic] [N1] [N2]      # default ws 1000 15000
#
# Knobs: MEMORY_IP (default 127.0.0.22; ports 7620-7622), MEMORY_DIR (work dir). One load
# generator holds at most ~19,000 connections here (20,000 files per process).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TRANSPORT=${1:-ws}
N1=${2:-1000}
N2=${3:-15000}
IP=${MEMORY_IP:-127.0.0.22}
DIR=${MEMORY_DIR:-$(mktemp -d -t chorus-memory.XXXXXX)}

case $TRANSPORT in
    ws) URL="ws://$IP:7620/ws" ;;
    quic) URL="quic://$IP:7621" ;;
    *) echo "the transport is ws or quic" >&2; exit 2 ;;
esac

echo "building chorus (release)…" >&2
cargo build -q --release --bin chorus
CHORUS=target/release/chorus

NODE=
cleanup() { [ -z "$NODE" ] || kill "$NODE" 2>/dev/null || true; }
trap cleanup EXIT

# shellcheck source=benches/common.sh
source benches/common.sh

# measure N: prints "N IDLE_KB LOADED_KB".
measure() {
    local n=$1 data=$DIR/node-$1 log=$DIR/loadgen-$1.log idle loaded
    "$CHORUS" serve --data-dir "$data" --http-addr "$IP:7620" --quic-addr "$IP:7621" \
        --cluster-addr "$IP:7622" --requests-per-sec 100000 --requests-burst 100000 \
        >"$DIR/node-$n.log" 2>&1 &
    NODE=$!
    wait_ready "$IP" 7620
    idle=$(rss_kb "$NODE")
    "$CHORUS" loadgen --url "$URL" --ca "$data/ca.pem" --listeners "$n" --senders 1 \
        --rate 1 --duration 8 --connect-rate 1000 --drain-secs 1 >"$DIR/loadgen-$n.out" 2>"$log" &
    local load=$!
    # Sending starts once every listener has joined; give it three comments.
    until grep -qE 'sent [3-9]' "$log" 2>/dev/null; do
        kill -0 "$load" 2>/dev/null || { echo "loadgen ended early: see $log" >&2; exit 1; }
        sleep 0.1
    done
    loaded=$(rss_kb "$NODE")
    wait "$load" || { echo "loadgen failed: see $log" >&2; exit 1; }
    kill "$NODE" 2>/dev/null || true
    wait "$NODE" 2>/dev/null || true
    NODE=
    echo "$n $idle $loaded"
}

echo "transport $TRANSPORT, $N1 and $N2 listeners in one room (work dir $DIR)" >&2
measure "$N1" >"$DIR/first"
measure "$N2" >"$DIR/second"
read -r a_n a_idle a_loaded <"$DIR/first"
read -r b_n b_idle b_loaded <"$DIR/second"
python3 - "$TRANSPORT" "$a_n" "$a_idle" "$a_loaded" "$b_n" "$b_idle" "$b_loaded" <<'EOF'
import sys
transport = sys.argv[1]
a_n, a_idle, a_loaded, b_n, b_idle, b_loaded = map(int, sys.argv[2:])
for n, idle, loaded in ((a_n, a_idle, a_loaded), (b_n, b_idle, b_loaded)):
    per = (loaded - idle) * 1024 / (n + 1)
    print(f"{transport:4} {n:6} connections: RSS {idle / 1024:6.1f} MiB idle, "
          f"{loaded / 1024:6.1f} MiB with them: {per / 1000:5.2f} KB per connection")
slope = (b_loaded - a_loaded) * 1024 / (b_n - a_n)
print(f"{transport:4} slope {a_n}-{b_n}: {slope / 1000:5.2f} KB per connection")
EOF
