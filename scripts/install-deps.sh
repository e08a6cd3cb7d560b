#!/usr/bin/env bash
# Installs the system packages embedrag builds and tests with, from Debian 12's archive.
# Runtime: utf8proc (Unicode data), cJSON (model configs), SQLite (the document store) and
# libmicrohttpd (`embedrag serve`). Build: gcc, cmake, pkg-config.
# With --tests, also what the tests need: clang and its runtime (libFuzzer, sanitizers),
# clang-format 14 (the format check), python3 with venv/pip (reference tokenizer fixtures, the
# server's client tests), the sqlite3 command (the store's integrity checks), Chromium with its
# WebDriver and selenium (the search page's test in a headless browser). Skips apt when
# everything is already there.
set -euo pipefail
packages=(build-essential cmake pkg-config libutf8proc-dev libcjson-dev libsqlite3-dev sqlite3
          libmicrohttpd-dev python3)
if [ "${1:-}" = --tests ]; then
    packages+=(clang libclang-rt-14-dev clang-format python3-venv python3-pip chromium
               chromium-driver python3-selenium)
fi
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
