# Shared shell helpers for the scripts in this folder (sourced, not run).
# shellcheck shell=bash

die() {  # print an error and the help hint, exit 2
    echo "error: $*" >&2
    echo "Run with -h for help." >&2
    exit 2
}

quote() {  # a command as text that can be pasted into a shell
    local out
    printf -v out '%q ' "$@"
    echo "${out% }"
}
