#!/bin/sh
# The image's entrypoint (under tini): `trident serve` reads the OpenAI frontend's key only from
# TRIDENT_API_KEY (trident/serve_config.py) and has no file setting, while compose and Kubernetes
# hand secrets over as files. This moves the file's content into the environment, so the key
# never appears in argv, then runs the command ("$@", by default `trident serve`).
set -eu

if [ -n "${TRIDENT_API_KEY_FILE:-}" ]; then
    if [ -n "${TRIDENT_API_KEY:-}" ]; then
        echo "entrypoint: set TRIDENT_API_KEY or TRIDENT_API_KEY_FILE, not both" >&2
        exit 64
    fi
    if [ ! -r "$TRIDENT_API_KEY_FILE" ]; then
        echo "entrypoint: TRIDENT_API_KEY_FILE=$TRIDENT_API_KEY_FILE is not a readable file" >&2
        exit 66
    fi
    # $(...) drops the trailing newline(s) a key file usually ends with.
    TRIDENT_API_KEY=$(cat "$TRIDENT_API_KEY_FILE")
    if [ -z "$TRIDENT_API_KEY" ]; then
        echo "entrypoint: $TRIDENT_API_KEY_FILE is empty" >&2
        exit 65
    fi
    export TRIDENT_API_KEY
    unset TRIDENT_API_KEY_FILE
fi

exec "$@"
