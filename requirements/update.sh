#!/bin/sh
# Resolve requirements/lock.txt again from pyproject.toml (the dependencies and the dev extras) and
# requirements/pins.txt, for Python 3.11 and newer on every platform. With no arguments the versions already in
# the lock are kept and only what changed is resolved; `--upgrade` moves everything to the newest release the
# ranges allow, `--upgrade-package NAME` one package. Needs the lock's uv: pip install -c requirements/lock.txt uv
set -e
cd "$(dirname "$0")/.."
uv pip compile pyproject.toml requirements/pins.txt --extra dev --universal --python-version 3.11 \
    --custom-compile-command "sh requirements/update.sh" --output-file requirements/lock.txt "$@"
