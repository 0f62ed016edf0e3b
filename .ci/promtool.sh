#!/usr/bin/env bash
# Usage: .ci/promtool.sh URL
#
# Fetches URL (a Prometheus /metrics endpoint, e.g.
# http://127.0.0.1:17070/metrics) with curl and runs `promtool check metrics`
# on the body (promtool is in Debian's package `prometheus`). Exits non-zero
# if the fetch fails, the body has no samples, or promtool reports any problem:
# parse errors (promtool exit 1) and lint problems such as a missing HELP or a
# counter without `_total` (promtool exit 3) both fail.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=.ci/lib.sh
source "$HERE/lib.sh"

if [ $# -ne 1 ]; then
    echo "usage: $0 http://HOST:PORT/metrics" >&2
    exit 2
fi
URL=$1

command -v promtool >/dev/null ||
    ci_die "promtool not found (apt-get install --no-install-recommends prometheus)"
command -v curl >/dev/null || ci_die "curl not found (apt-get install curl)"

tmp=$(mktemp -d -t ci-promtool.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

ci_log "promtool: $(promtool --version 2>&1 | head -n 1)"
ci_log "promtool: GET $URL"
curl --fail --silent --show-error --max-time 15 \
    --dump-header "$tmp/headers" --output "$tmp/body" "$URL" ||
    ci_die "promtool: could not fetch $URL"

ctype=$(tr -d '\r' <"$tmp/headers" | awk -F': *' 'tolower($1) == "content-type" { v = $2 } END { print v }')
bytes=$(wc -c <"$tmp/body")
samples=$(grep -cvE '^[[:space:]]*(#|$)' "$tmp/body" || true)
families=$(grep -cE '^# TYPE ' "$tmp/body" || true)
ci_log "promtool: ${bytes} bytes, ${families} metric families (# TYPE), ${samples} samples, Content-Type: ${ctype:-none}"
case "$ctype" in
text/plain*) ;;
*) ci_log "promtool: note: Content-Type is not text/plain (the Prometheus text format's type)" ;;
esac
[ "$samples" -gt 0 ] || ci_die "promtool: $URL returned no samples"

rc=0
promtool check metrics <"$tmp/body" >"$tmp/out" 2>&1 || rc=$?
if [ "$rc" -ne 0 ]; then
    echo "promtool: check metrics failed (exit $rc: 1 = parse error, 3 = lint problems):"
    sed 's/^/  /' "$tmp/out"
    exit 1
fi
if [ -s "$tmp/out" ]; then
    sed 's/^/  /' "$tmp/out"
fi
ci_log "promtool: check metrics passed"
