# The shell tests' check, sourced by tests/test_*.sh (as check.h serves the C tests):
# `check DESCRIPTION COMMAND...` runs COMMAND, counts it in $checks, and where it fails counts it
# in $failures and names it on stderr. Each test prints its summary from the two counts.
checks=0
failures=0
check() {
    local what=$1
    shift
    checks=$((checks + 1))
    if ! "$@"; then
        failures=$((failures + 1))
        echo "FAILED: $what" >&2
    fi
}
