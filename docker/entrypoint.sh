#!/bin/sh
# Entry point of the kvswap images: make sure $KVSWAP_HOME holds the default model and its
# low-rank key adapter, then run the command (`vllm serve ...`) in this process.
#
# The images bake both into /data at build time and Docker copies them into a new named
# volume; a bind-mounted host folder starts empty, and this fills it once (~1-2 min). Once
# there, both steps are no-ops (~10 s). KVSWAP_SKIP_SETUP=1 skips them, e.g. when
# serving another model.
set -eu

if [ -z "${KVSWAP_HOME:-}" ]; then
    echo "kvswap-entrypoint: KVSWAP_HOME is not set (the images set it to /data)" >&2
    exit 2
fi

if [ "${KVSWAP_SKIP_SETUP:-0}" != 1 ]; then
    mkdir -p "$KVSWAP_HOME"
    if [ ! -w "$KVSWAP_HOME" ]; then
        echo "kvswap-entrypoint: $KVSWAP_HOME is not writable by uid $(id -u):" \
             "chown the mounted folder to it, or run with --user \"\$(id -u):\$(id -g)\"" >&2
        exit 2
    fi
    kvswap model prepare >&2
    kvswap calibrate --if-missing >&2
fi

exec "$@"
