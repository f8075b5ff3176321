#!/usr/bin/env bash
# Start edged on the embedded model with a private socket, ask one question, stop it cleanly.
set -euo pipefail
dir=$(mktemp -d)
export EDGED_SOCKET__PATH="$dir/edged.sock"
export EDGED_LOG__FORMAT=console
echo "starting: edged serve   (socket $EDGED_SOCKET__PATH, log $dir/edged.log)"
edged serve >"$dir/edged.log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 1 240); do
    if grep -q "ready_ms" "$dir/edged.log" 2>/dev/null; then break; fi
    kill -0 $pid 2>/dev/null || { cat "$dir/edged.log"; echo "edged serve exited early" >&2; exit 1; }
    sleep 0.25
done
cat "$dir/edged.log"
echo
echo "\$ edged ask 'Name three uses of a Raspberry Pi.'"
edged ask --max-tokens 96 'Name three uses of a Raspberry Pi.'
echo
echo "\$ edged status"
edged status
