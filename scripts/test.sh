#!/usr/bin/env bash
# The one command that runs every test. Installs what the tests need (system packages, the
# models, the reference `tokenizers` package in .venv-test for the parity fixtures), then runs
# the suite twice: an optimized gcc build, and a clang build under AddressSanitizer and
# UndefinedBehaviorSanitizer that also runs each libFuzzer target briefly. Ends with the
# combined "N passed, N failed" line.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)

scripts/install-deps.sh
scripts/fetch-models.sh

# Reference tokenizer for the parity fixtures (tests only; never a runtime dependency).
if [ ! -x .venv-test/bin/python ] || ! .venv-test/bin/python -c 'import tokenizers' 2>/dev/null; then
    python3 -m venv .venv-test
    .venv-test/bin/pip install --quiet --disable-pip-version-check tokenizers==0.23.3
fi
.venv-test/bin/python tests/fixtures/make_tokenizer_fixtures.py

cmake -S . -B build-release -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build-release -j"$jobs"
CC=clang cmake -S . -B build-sanitize -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEMBEDRAG_SANITIZE=ON \
    -DEMBEDRAG_FUZZ=ON >/dev/null
cmake --build build-sanitize -j"$jobs"

passed=0
failed=0
run_suite() {
    local dir=$1 log
    log=$(mktemp)
    echo "== ctest in $dir"
    (cd "$dir" && ctest --output-on-failure) 2>&1 | tee "$log" || true
    local line total bad
    line=$(grep -E '[0-9]+% tests passed, [0-9]+ tests? failed out of [0-9]+' "$log" | tail -n 1)
    rm -f "$log"
    if [ -z "$line" ]; then
        echo "ctest in $dir printed no summary" >&2
        failed=$((failed + 1))
        return
    fi
    bad=$(echo "$line" | sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\1/')
    total=$(echo "$line" | sed -E 's/.* failed out of ([0-9]+).*/\1/')
    passed=$((passed + total - bad))
    failed=$((failed + bad))
}
run_suite build-release
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    run_suite build-sanitize
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
