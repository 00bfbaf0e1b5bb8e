#!/bin/sh
# Entry point of the Outpost image: the first argument picks what runs.
#
#   hub [FLAGS]           outpost-hub run; API on 0.0.0.0:7000, data in /var/lib/outpost-hub
#   agent [FLAGS]         outpost-agent; API on 0.0.0.0:7070, data in /var/lib/outpost
#   nats [FLAGS]          nats-server, e.g. nats -c /etc/outpost/nats/hub.conf
#   token|apitoken|site   outpost-hub token|apitoken|site ... (join tokens, API tokens, bundles)
#   outpost [ARGS]        the API client
#   anything else         runs as it is (sh, python, ...)
#
# OUTPOST_* environment variables set any setting (OUTPOST_NATS_URL, OUTPOST_SITE, ...); the
# data dir and the listen address above are only defaults.
set -eu

role=${1:-help}
if [ $# -gt 0 ]; then shift; fi

case $role in
    hub)
        OUTPOST_DATA_DIR=${OUTPOST_DATA_DIR:-/var/lib/outpost-hub}
        OUTPOST_LISTEN=${OUTPOST_LISTEN:-0.0.0.0:7000}
        export OUTPOST_DATA_DIR OUTPOST_LISTEN
        exec outpost-hub run "$@"
        ;;
    agent)
        OUTPOST_DATA_DIR=${OUTPOST_DATA_DIR:-/var/lib/outpost}
        OUTPOST_LISTEN=${OUTPOST_LISTEN:-0.0.0.0:7070}
        export OUTPOST_DATA_DIR OUTPOST_LISTEN
        exec outpost-agent "$@"
        ;;
    nats)
        exec nats-server "$@"
        ;;
    token|apitoken|site)
        exec outpost-hub "$role" "$@"
        ;;
    outpost)
        exec outpost "$@"
        ;;
    help|-h|--help)
        sed -n '2,/^set -eu/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
        ;;
    *)
        exec "$role" "$@"
        ;;
esac
