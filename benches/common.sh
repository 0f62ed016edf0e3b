# Helpers the bench scripts share (sourced, not run).

# cpu_ticks PID: the process's user + system CPU time, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# rss_kb PID: the process's resident set, in kB.
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# wait_port IP PORT: until something accepts TCP connections there (30 s at most).
wait_port() {
    local deadline=$((SECONDS + 30))
    until (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || { echo "nothing listens on $1:$2" >&2; exit 1; }
        sleep 0.1
    done
}

# wait_ready IP PORT: until the Chorus node there answers 200 on /readyz (60 s at most):
# a node accepts connections before it is a working member, and answers 503 until then.
wait_ready() {
    local deadline=$((SECONDS + 60))
    until curl --fail --silent --max-time 2 --output /dev/null "http://$1:$2/readyz"; do
        [ $SECONDS -lt $deadline ] || { echo "the node on $1:$2 is not ready" >&2; exit 1; }
        sleep 0.1
    done
}
