#!/usr/bin/env bash
# The main job with zero setup: an embedded MQTT broker (debfleet serve) and one local agent that
# reports this machine as device "local". Ctrl-C stops both. In another terminal:
#   target/debug/debfleet devices
set -euo pipefail
cd "$(dirname "$0")/.."
LISTEN=${DEBFLEET_LISTEN:-127.0.0.1:1883}
cargo build --bins
state=$(mktemp -d)
sed -e "s#@BROKER@#mqtt://$LISTEN#" -e "s#@STATE@#$state#" examples/agent.toml > "$state/agent.toml"
target/debug/debfleet serve --listen "$LISTEN" &
serve=$!
trap 'kill $serve $agent 2>/dev/null; wait 2>/dev/null; rm -rf "$state"' EXIT INT TERM
sleep 0.3
target/debug/debfleet-agent --config "$state/agent.toml" &
agent=$!
cat <<TOUR

debfleet is running: embedded broker on mqtt://$LISTEN, one agent as device "local".
Try, in another terminal:
  export DEBFLEET_BROKER=mqtt://$LISTEN
  target/debug/debfleet devices
  target/debug/debfleet show local
  target/debug/debfleet ping --all
  target/debug/debfleet cfg set local telemetry.cpu.interval_s=2
  target/debug/debfleet watch
Ctrl-C here stops both.

TOUR
wait $serve
