#!/usr/bin/env bash
# Install the Debian packages that are missing, as COMMAND:PACKAGE pairs:
#   scripts/debian-deps.sh memcached:memcached wrk:wrk nginx:nginx-light
set -euo pipefail
missing=()
for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || [ -x "/usr/sbin/${pair%%:*}" ] || missing+=("${pair#*:}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "please install: ${missing[*]} (apt-get install ${missing[*]})" >&2
    exit 1
fi
