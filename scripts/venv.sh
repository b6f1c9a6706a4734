#!/usr/bin/env bash
# Create .venv and install stor into it, with the extras named in $2 (e.g. "test,lint"), on a
# fresh Debian machine too.
set -euo pipefail
venv=${1:-.venv}
extras=${2:-}
python=${PYTHON:-python3}
if ! "$python" -m venv --help >/dev/null 2>&1 || ! "$python" -c 'import ensurepip' >/dev/null 2>&1; then
    # Debian splits venv/ensurepip out of python3.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
        echo "python3 -m venv is not available: install python3-venv" >&2
        exit 1
    fi
fi
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet -e ".${extras:+[$extras]}"
