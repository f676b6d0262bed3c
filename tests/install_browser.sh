#!/bin/sh
# The headless browser the playground test drives: Debian's Chromium (the package `chromium`), installed where it
# is missing. Elsewhere, install Chromium by hand and point PLAYGROUND_BROWSER at its executable.
set -e
if [ -n "$PLAYGROUND_BROWSER" ] || command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install Chromium and set PLAYGROUND_BROWSER to its executable (the playground test drives it)" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
$SUDO apt-get install -y -q chromium >/dev/null || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }
