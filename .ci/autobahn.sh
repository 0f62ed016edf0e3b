#!/usr/bin/env bash
# Usage: .ci/autobahn.sh URL
#
# Runs the Autobahn TestSuite WebSocket cases 1-10 (fuzzingclient mode: the
# suite is the client, URL is the server under test, normally an echo endpoint
# such as ws://127.0.0.1:17070/ws/echo) with `kosoku` from PyPI, a native
# runner of Autobahn's own case files. Prints a per-group summary and every
# failing case with the reason, and exits non-zero if any case failed.
#
# Verdicts follow Autobahn's convention (and kosoku's own `passed`): a case
# passes when its behavior is OK, NON-STRICT or INFORMATIONAL and its close
# behavior is OK or INFORMATIONAL. FAILED, UNIMPLEMENTED, ERROR, or a close
# that is UNCLEAN / WRONG CODE / FAILED fail.
#
# Groups 12.* and 13.* (permessage-deflate) are excluded: /ws/echo does not
# offer compression. Autobahn has no group 8 and no group 11.
#
# Environment (all optional):
#   AUTOBAHN_CASES        space-separated case ids / globs to run
#                         (default: "1.* 2.* 3.* 4.* 5.* 6.* 7.* 9.* 10.*")
#   AUTOBAHN_EXCLUDE      space-separated globs to exclude (default: "12.* 13.*")
#   AUTOBAHN_REPORT_DIR   where the Autobahn-format reports go
#                         (default: <repo>/target/autobahn; index.html there)
#   AUTOBAHN_PARALLELISM  cases run in parallel (default: 1)
#   AUTOBAHN_TIMEOUT      seconds before the whole run is abandoned (default: 900)
#   CI_PYTHON             python interpreter that has kosoku (default: python3)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=.ci/lib.sh
source "$HERE/lib.sh"

if [ $# -ne 1 ]; then
    echo "usage: $0 ws://HOST:PORT/PATH" >&2
    exit 2
fi
URL=$1
case "$URL" in
ws://* | wss://*) ;;
*) ci_die "URL must start with ws:// or wss:// (got '$URL')" ;;
esac

CASES=${AUTOBAHN_CASES:-"1.* 2.* 3.* 4.* 5.* 6.* 7.* 9.* 10.*"}
EXCLUDE=${AUTOBAHN_EXCLUDE-"12.* 13.*"}
OUT=${AUTOBAHN_REPORT_DIR:-$ROOT/target/autobahn}
PARALLELISM=${AUTOBAHN_PARALLELISM:-1}
TIMEOUT=${AUTOBAHN_TIMEOUT:-900}

"$CI_PYTHON" -c 'import kosoku' 2>/dev/null ||
    ci_die "kosoku is not installed for $CI_PYTHON (pip install kosoku)"

# kosoku writes the report only at the end of a run; drop any earlier one so a
# crashed run can never be judged from stale files.
mkdir -p "$OUT"
rm -f "$OUT"/index.json "$OUT"/index.html "$OUT"/*_case_*.json "$OUT"/*_case_*.html

args=()
set -f # the globs are kosoku's, not the shell's
for c in $CASES; do args+=(--include "$c"); done
for x in $EXCLUDE; do args+=(--exclude "$x"); done
set +f

# Run kosoku's own console script through the interpreter that has it (its
# entry point, looked up by name), so a PATH without pip's script directory
# does not matter.
KOSOKU=("$CI_PYTHON" -c '
import sys
from importlib.metadata import entry_points
(ep,) = entry_points(group="console_scripts", name="kosoku")
sys.argv[0] = "kosoku"
sys.exit(ep.load()())
')
version=$("$CI_PYTHON" -c 'from importlib.metadata import version; print(version("kosoku"))')

ci_log "autobahn: kosoku $version, fuzzingclient -> $URL"
ci_log "autobahn: cases [$CASES] excluding [$EXCLUDE], parallelism $PARALLELISM, report in $OUT"
start=$(date +%s)
rc=0
# --foreground: stay in our process group, so stopping the caller's group
# stops kosoku too.
timeout --foreground --kill-after=10 "$TIMEOUT" \
    "${KOSOKU[@]}" --mode fuzzingclient --outdir "$OUT" --parallelism "$PARALLELISM" \
    "${args[@]}" "$URL" || rc=$?
elapsed=$(($(date +%s) - start))
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    ci_die "autobahn: kosoku did not finish within ${TIMEOUT}s"
fi
ci_log "autobahn: kosoku exited $rc after ${elapsed}s"

# Our own verdict from the report files; it also checks that every selected
# group ran and no excluded case did, so a wrong selection cannot pass.
src=0
"$CI_PYTHON" "$HERE/autobahn_summary.py" "$OUT" --cases "$CASES" --exclude "$EXCLUDE" || src=$?

if [ "$rc" -ne 0 ] || [ "$src" -ne 0 ]; then
    ci_log "autobahn: FAILED (kosoku exit $rc, summary exit $src); report: $OUT/index.html"
    exit 1
fi
ci_log "autobahn: all cases passed in ${elapsed}s"
