#!/usr/bin/env bash
# Start edged on the embedded model with a private socket, ask one question, stop it cleanly.
set -euo pipefail
dir=$(mktemp -d)
export EDGED_SOCKET__PATH="$dir/edged.sock"
export EDGED_LOG__FORMAT=console
edged serve &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 1 120); do
    if edged status --json >/dev/null 2>&1; then
        state=$(edged status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["engine"]["state"])')
        [ "$state" = ready ] && break
    fi
    kill -0 $pid 2>/dev/null || { echo "edged serve exited early" >&2; exit 1; }
    sleep 0.5
done
echo
echo "\$ edged ask 'Name three uses of a Raspberry Pi.'"
edged ask --max-tokens 96 'Name three uses of a Raspberry Pi.'
echo
edged status
