#!/usr/bin/env bash
# The fan-out floor and a Chorus node under the same load, one after the other, on this
# machine: `benches/fanout_floor.rs` (a minimal writer: one frame encoded once, one write()
# per listener, nothing else) and one `chorus serve`, each driven by the same
# `chorus loadgen` run (LISTENERS WebSocket listeners in one room, SENDERS senders at one
# comment per second each, for DURATION seconds). For each server it prints the server's
# own CPU time per million deliveries, counted from /proc while comments flow (the
# connection ramp excluded), its RSS, and RSS per connection over its idle RSS.
#
#   benches/fanout.sh [LISTENERS] [SENDERS] [DURATION]      # default 9000 10 20
#
# Knobs: FANOUT_IP (default 127.0.0.21; the floor on port 7600, the node on 7610-7612),
# FANOUT_PROFILE (release, default; `dev` for a quick check), FANOUT_DIR (work dir).
# A listener count above ~19,000 needs several load generators (one process holds at most
# 20,000 files here); this script runs one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

LISTENERS=${1:-9000}
SENDERS=${2:-10}
DURATION=${3:-20}
IP=${FANOUT_IP:-127.0.0.21}
PROFILE=${FANOUT_PROFILE:-release}
DIR=${FANOUT_DIR:-$(mktemp -d -t chorus-fanout.XXXXXX)}
TCK=$(getconf CLK_TCK)

case $PROFILE in
    release) OUT=target/release; BUILD=(--release) ;;
    dev) OUT=target/debug; BUILD=() ;;
    *) echo "FANOUT_PROFILE is release or dev" >&2; exit 2 ;;
esac

echo "building chorus and the floor ($PROFILE)…" >&2
cargo build -q "${BUILD[@]}" --bin chorus
if [ "$PROFILE" = release ]; then
    cargo bench -q --bench fanout_floor --no-run 2>/dev/null
else
    cargo test -q --bench fanout_floor --no-run 2>/dev/null
fi
CHORUS=$OUT/chorus

PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

# shellcheck source=benches/common.sh
source benches/common.sh

# run_load LABEL URL PID: the load run against the server PID; prints one table row.
run_load() {
    local label=$1 url=$2 pid=$3 idle cpu0 cpu1 rss log=$DIR/$1.log json=$DIR/$1.json
    idle=$(rss_kb "$pid")
    "$CHORUS" loadgen --url "$url" --listeners "$LISTENERS" --senders "$SENDERS" --rate 1 \
        --duration "$DURATION" --connect-rate 2000 --drain-secs 5 --json "$json" \
        >"$DIR/$label.out" 2>"$log" &
    local load=$!
    # CPU from the first comment on: the connection ramp is not fan-out.
    until grep -qE 'sent [1-9]' "$log" 2>/dev/null; do
        kill -0 "$load" 2>/dev/null || break
        sleep 0.05
    done
    cpu0=$(cpu_ticks "$pid")
    rss=$(rss_kb "$pid")
    wait "$load" || { echo "loadgen against $label failed: see $log" >&2; tail -5 "$log" >&2; }
    cpu1=$(cpu_ticks "$pid")
    python3 - "$label" "$json" "$cpu0" "$cpu1" "$TCK" "$idle" "$rss" <<'EOF'
import json, sys
label, path, cpu0, cpu1, tck, idle, rss = sys.argv[1:]
r = json.load(open(path))
cpu_s = (int(cpu1) - int(cpu0)) / int(tck)
deliveries = r["deliveries"]
conns = r["listeners_connected"] + r["senders_connected"] + 1
per_million = cpu_s / deliveries * 1e6 if deliveries else float("nan")
per_conn_kb = (int(rss) - int(idle)) / conns if conns else float("nan")
print(f"{label:8} delivered {r['delivery_ratio']*100:6.2f}% · p99 {r['latency']['p99_ms']:8.1f} ms · "
      f"{cpu_s:6.2f} CPU-s for {deliveries} deliveries = {per_million:5.2f} CPU-s per million · "
      f"RSS {int(rss)/1024:6.1f} MiB ({per_conn_kb:5.1f} KiB per connection over idle {int(idle)/1024:.1f} MiB)")
EOF
}

echo "load: $LISTENERS listeners × $SENDERS comments/s for $DURATION s (work dir $DIR)" >&2

# 1. The floor.
FLOOR_BIN=$(find "$OUT/deps" -maxdepth 1 -type f -perm -u+x -name 'fanout_floor-*' -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2)
[ -n "$FLOOR_BIN" ] || { echo "the floor's binary was not built" >&2; exit 1; }
"$FLOOR_BIN" "$IP:7600" "$DIR/floor.pid" 2>"$DIR/floor.err" &
PIDS+=($!)
wait_port "$IP" 7600
run_load floor "ws://$IP:7600/ws" "$(cat "$DIR/floor.pid")"
kill "${PIDS[-1]}" 2>/dev/null || true

# 2. One Chorus node (a single-node cluster: each comment flushed to its disk first).
"$CHORUS" serve --data-dir "$DIR/node" --http-addr "$IP:7610" --quic-addr "$IP:7611" \
    --cluster-addr "$IP:7612" --requests-per-sec 100000 --requests-burst 100000 \
    >"$DIR/node.log" 2>&1 &
PIDS+=($!)
wait_ready "$IP" 7610
run_load chorus "ws://$IP:7610/ws" "${PIDS[-1]}"
