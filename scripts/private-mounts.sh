#!/usr/bin/env bash
# Run a command in a private mount namespace when root, so no mount a test makes outlives it
# (tests/faults mounts tmpfs, ext4 images and FUSE). Otherwise run it as it is; the tests that
# mount then skip, saying why.
set -euo pipefail
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null && unshare -m --propagation private true 2>/dev/null; then
    exec unshare -m --propagation private "$@"
fi
exec "$@"
