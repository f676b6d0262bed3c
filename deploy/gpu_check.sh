#!/usr/bin/env bash
# The GPU check lives beside its module now: bench/gpu_check.sh (this name is kept for the commands that use it).
exec bash "$(dirname "$0")/../bench/gpu_check.sh" "$@"
