#!/usr/bin/env bash
# Debian packages the test suite runs for real: memcached (started by the tests on free ports).
set -euo pipefail
missing=()
command -v memcached >/dev/null || missing+=(memcached)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "the tests need: ${missing[*]} (apt-get install ${missing[*]})" >&2
    exit 1
fi
