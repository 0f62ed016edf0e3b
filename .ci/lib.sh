# Shared helpers for the scripts in .ci/ (sourced, not executed).
# shellcheck shell=bash

# Seconds since the sourcing script started (bash's SECONDS is per shell).
CI_T0=${CI_T0:-$(date +%s)}
export CI_T0

ci_stamp() {
    local now
    now=$(date +%s)
    printf '%s +%ss' "$(date -u +%H:%M:%SZ)" "$((now - CI_T0))"
}

# A clear section header with a timestamp.
ci_section() {
    printf '\n==== [%s] %s ====\n' "$(ci_stamp)" "$*"
}

ci_log() {
    printf '[%s] %s\n' "$(ci_stamp)" "$*"
}

ci_die() {
    printf '[%s] ERROR: %s\n' "$(ci_stamp)" "$*" >&2
    exit 1
}

# ci_quiet DESCRIPTION CMD...: run CMD with its output captured; print the output
# only if CMD fails (then return its exit code). For noisy installers.
ci_quiet() {
    local what=$1 log rc=0
    shift
    log=$(mktemp -t ci-quiet.XXXXXX)
    "$@" >"$log" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
        printf '[%s] FAILED (exit %s): %s\n  command: %s\n---- output ----\n' \
            "$(ci_stamp)" "$rc" "$what" "$*" >&2
        tail -n 200 "$log" >&2
        printf -- '---- end of output ----\n' >&2
    fi
    rm -f "$log"
    return "$rc"
}

# The python interpreter used for pip installs and for the Python test tools.
# Everything Python-side goes through this one interpreter so that what pip
# installed is what runs.
CI_PYTHON=${CI_PYTHON:-python3}
export CI_PYTHON
