#!/bin/sh
# What some tests drive besides Python: Debian's Chromium (the playground test) and redis-server (GCS fault
# tolerance), installed where they are missing. Elsewhere, install them by hand (PLAYGROUND_BROWSER may name the
# browser's executable).
set -e
missing=""
if [ -z "$PLAYGROUND_BROWSER" ] && ! command -v chromium >/dev/null 2>&1; then missing="$missing chromium"; fi
if ! command -v redis-server >/dev/null 2>&1; then missing="$missing redis-server"; fi
[ -z "$missing" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install$missing (the playground and GCS fault-tolerance tests use them)" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
$SUDO apt-get install -y -q $missing >/dev/null || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q $missing >/dev/null; }
