#!/usr/bin/env bash
# Installs the build into a temporary prefix and uses it as a user would: examples/similarity.c
# built with `cc $(pkg-config --cflags --libs embedrag)` (shared library), with pkg-config
# --static against the archive, and by a CMake project with find_package(embedrag) (both
# targets). Each program must run and print its usage error. Needs no model.
set -u
build=${EMBEDRAG_BINARY_DIR:?set by ctest}
src=${EMBEDRAG_SOURCE_DIR:?set by ctest}
cc=${CC:-cc}
cmake=${CMAKE_COMMAND:-cmake}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
prefix=$tmp/prefix
# shellcheck source=check.sh
. "$src/tests/check.sh"
# usage PROGRAM [ENV...]: run without arguments, expect status 2 and the usage line.
usage() {
    local program=$1 status
    shift
    env "$@" "$program" </dev/null >/dev/null 2>"$tmp/usage.txt"
    status=$?
    if [ "$status" -ne 2 ] || ! grep -q '^usage: similarity MODEL_DIR' "$tmp/usage.txt"; then
        echo "$program: status $status, stderr:" >&2
        cat "$tmp/usage.txt" >&2
        return 1
    fi
}

version=$(sed -nE 's/^#define EMBEDRAG_VERSION_(MAJOR|MINOR|PATCH) ([0-9]+)$/\2/p' \
    "$src/include/embedrag.h" | paste -sd.)

if ! "$cmake" --install "$build" --prefix "$prefix" >"$tmp/install.log" 2>&1; then
    cat "$tmp/install.log" >&2
    echo "FAILED: cmake --install $build --prefix $prefix" >&2
    exit 1
fi
pc=$(find "$prefix" -name embedrag.pc)
libdir=$(dirname "$(dirname "$pc")")
check "embedrag.pc installed" test -f "$pc"
check "header installed" test -f "$prefix/include/embedrag.h"
check "static library installed" test -f "$libdir/libembedrag.a"
check "shared library installed" test -f "$libdir/libembedrag.so"
check "CMake package installed" test -f "$libdir/cmake/embedrag/embedragConfig.cmake"
check "installed embedrag --help runs" "$prefix/bin/embedrag" --help >/dev/null

# pkg-config, as the README says; the program finds the shared library through LD_LIBRARY_PATH.
export PKG_CONFIG_PATH=$libdir/pkgconfig
check "pkg-config --modversion is the header's $version" \
    test "$(pkg-config --modversion embedrag)" = "$version"
# shellcheck disable=SC2046 # word splitting of pkg-config's flags is intended
check "cc \$(pkg-config --cflags --libs embedrag)" \
    "$cc" -o "$tmp/similarity_pc" "$src/examples/similarity.c" $(pkg-config --cflags --libs embedrag)
check "pkg-config build prints usage" usage "$tmp/similarity_pc" LD_LIBRARY_PATH="$libdir"
# The archive alone, with the private dependencies of --static (Requires.private, Libs.private).
static_libs=$(pkg-config --static --libs embedrag | sed 's/-lembedrag\b/-l:libembedrag.a/')
# shellcheck disable=SC2046,SC2086
check "cc \$(pkg-config --cflags --static --libs embedrag) with libembedrag.a" \
    "$cc" -o "$tmp/similarity_pc_static" "$src/examples/similarity.c" \
    $(pkg-config --cflags embedrag) $static_libs
check "static pkg-config build needs no libembedrag.so" \
    bash -c "! readelf -d '$tmp/similarity_pc_static' | grep -q libembedrag"
check "static pkg-config build prints usage" usage "$tmp/similarity_pc_static"

# find_package(embedrag) from a separate CMake project (tests/install/CMakeLists.txt).
if "$cmake" -S "$src/tests/install" -B "$tmp/consumer" -DCMAKE_PREFIX_PATH="$prefix" \
    -DCMAKE_C_COMPILER="$cc" -DEXAMPLE="$src/examples/similarity.c" \
    -DEXPECTED_VERSION="$version" >"$tmp/consumer.log" 2>&1 &&
    "$cmake" --build "$tmp/consumer" >>"$tmp/consumer.log" 2>&1; then
    check "find_package build, embedrag::embedrag, prints usage" usage "$tmp/consumer/similarity_static"
    check "find_package build, embedrag::embedrag_shared, prints usage" \
        usage "$tmp/consumer/similarity_shared"
else
    cat "$tmp/consumer.log" >&2
    check "find_package(embedrag) project configures and builds" false
fi

echo "test_install: $checks checks, $failures failed"
[ "$failures" -eq 0 ]
