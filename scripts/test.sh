#!/usr/bin/env bash
# The one command that runs every test. Installs what the tests need (system packages, the
# models, the reference `tokenizers` package in .venv-test for the parity fixtures), then runs
# three suites: an optimized gcc build (every test, with the format check and an install into a
# temporary prefix); a clang build under AddressSanitizer and UndefinedBehaviorSanitizer that
# also runs each libFuzzer target briefly; and a clang ThreadSanitizer build of only the library
# and the tests labelled `threads`. Tests labelled `gpu` run only where nvidia-smi sees a GPU.
# Prints each suite's tests per label, and ends with the combined "N passed, N failed" line.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)

scripts/install-deps.sh --tests
scripts/fetch-models.sh

# Tests only, never runtime dependencies: the reference tokenizer for the parity fixtures, and
# OpenAI's Python client, which test_server drives the server with.
if [ ! -x .venv-test/bin/python ] ||
    ! .venv-test/bin/python -c 'import tokenizers, openai' 2>/dev/null; then
    [ -x .venv-test/bin/python ] || python3 -m venv .venv-test
    .venv-test/bin/pip install --quiet --disable-pip-version-check tokenizers==0.23.3 \
        openai==3.57.0
fi
.venv-test/bin/python tests/fixtures/make_tokenizer_fixtures.py

cmake -S . -B build-release -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build-release -j"$jobs"
# The sanitizer builds leave the CUDA backend out: the optimized build compiles it (and its tests
# run its host code, without a device here), no sanitizer instruments device code, and nvcc spent
# ~3.5 minutes of each build on the kernels.
CC=clang cmake -S . -B build-sanitize -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEMBEDRAG_SANITIZE=ON \
    -DEMBEDRAG_FUZZ=ON -DEMBEDRAG_CUDA=OFF >/dev/null
cmake --build build-sanitize -j"$jobs"
# EMBEDRAG_TSAN defines only the library and the tests labelled `threads`, so this builds little.
CC=clang cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEMBEDRAG_TSAN=ON \
    -DEMBEDRAG_CUDA=OFF >/dev/null
cmake --build build-tsan -j"$jobs"

# Tests labelled gpu need a CUDA device.
ctest_filter=()
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "no GPU found by nvidia-smi: tests labelled gpu are left out"
    ctest_filter=(-LE gpu)
fi

# ThreadSanitizer (clang 14) aborts with "unexpected memory mapping" where the kernel randomizes
# mmap with more than 28 bits (vm.mmap_rnd_bits); the TSan suite runs with address-space
# randomization off, which avoids it whatever the setting.
tsan_launch=()
if setarch "$(uname -m)" -R true 2>/dev/null; then
    tsan_launch=(setarch "$(uname -m)" -R)
elif [ "$(cat /proc/sys/vm/mmap_rnd_bits 2>/dev/null || echo 0)" -gt 28 ]; then
    echo "setarch -R is not allowed here and vm.mmap_rnd_bits > 28: ThreadSanitizer may abort;" \
        "sysctl -w vm.mmap_rnd_bits=28 fixes it" >&2
fi

passed=0
failed=0
summaries=()
run_suite() { # run_suite DIR [LAUNCHER...] [-- CTEST OPTION...]
    local dir=$1 log launcher=() options=()
    shift
    while [ $# -gt 0 ] && [ "$1" != -- ]; do
        launcher+=("$1")
        shift
    done
    [ $# -gt 0 ] && shift
    options=("$@")
    log=$(mktemp)
    echo "== ctest in $dir"
    (cd "$dir" && "${launcher[@]}" ctest --output-on-failure "${ctest_filter[@]}" "${options[@]}") \
        2>&1 | tee "$log" || true
    local line total bad labels
    line=$(grep -E '[0-9]+% tests passed, [0-9]+ tests? failed out of [0-9]+' "$log" | tail -n 1)
    # "unit    =   3.35 sec*proc (5 tests)" lines after "Label Time Summary:" -> "unit 5"
    labels=$(sed -n '/^Label Time Summary:/,/^$/p' "$log" |
        sed -nE 's/^([^ ]+) +=.*\(([0-9]+) tests?\)$/\1 \2/p' | paste -sd, | sed 's/,/, /g')
    rm -f "$log"
    if [ -z "$line" ]; then
        echo "ctest in $dir printed no summary" >&2
        failed=$((failed + 1))
        summaries+=("$dir: no summary")
        return
    fi
    bad=$(echo "$line" | sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\1/')
    total=$(echo "$line" | sed -E 's/.* failed out of ([0-9]+).*/\1/')
    passed=$((passed + total - bad))
    failed=$((failed + bad))
    summaries+=("$dir: $((total - bad)) passed, $bad failed (tests per label: ${labels:-none})")
}
run_suite build-release
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    run_suite build-sanitize
TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
    run_suite build-tsan "${tsan_launch[@]}" -- -L threads
printf '%s\n' "${summaries[@]}"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
