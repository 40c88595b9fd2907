#!/usr/bin/env bash
# The main job. As root: `debfleet demo` — the embedded broker, a repository server with the
# agent and a sample package, three lab devices (systemd-nspawn) running the agent, and a guided
# tour; Ctrl-C takes it all down. As another user (no containers): the zero-setup broker and one
# agent on this machine. Extra arguments go to `debfleet demo` (e.g. --devices 5).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --bins
if [ "$(id -u)" -eq 0 ]; then
    # The demo's robot runs on ROS 1: Debian's rosmaster, on this machine.
    if ! command -v rosmaster >/dev/null; then
        echo "installing python3-rosmaster (the demo's robot speaks ROS 1)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-rosmaster >/dev/null
    fi
    bash scripts/build-debs.sh >/dev/null
    agent_deb=$(ls target/debs/debfleet-agent_*.deb | head -n 1)
    exec target/debug/debfleet demo --agent-deb "$agent_deb" "$@"
fi
echo "not root: no lab devices; running the embedded broker and one local agent instead" >&2
LISTEN=${DEBFLEET_LISTEN:-127.0.0.1:1883}
state=$(mktemp -d)
sed -e "s#@BROKER@#mqtt://$LISTEN#" -e "s#@STATE@#$state#" examples/agent.toml > "$state/agent.toml"
# The web console beside the broker, with one user whose password is made now.
password=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "$password" | target/debug/debfleet web user add demo --role admin --users "$state/web-users" >/dev/null
target/debug/debfleet serve --listen "$LISTEN" --web-listen "${DEBFLEET_WEB_LISTEN:-127.0.0.1:8088}" \
    --users "$state/web-users" --audit "$state/audit.log" &
serve=$!
trap 'kill $serve $agent $led 2>/dev/null; wait 2>/dev/null; rm -rf "$state"' EXIT INT TERM
sleep 0.3
target/debug/debfleet-agent --config "$state/agent.toml" &
agent=$!
# The LED-strip component beside it (a virtual strip), as its unit would run it on a device.
mkdir -p "$state/led-strip"
DEBFLEET_SOCKET="$state/agent.sock" STATE_DIRECTORY="$state/led-strip" RUNTIME_DIRECTORY="$state/led-strip" \
    target/debug/debfleet-led-strip 2>/dev/null &
led=$!
cat <<TOUR

debfleet is running: embedded broker on mqtt://$LISTEN, one agent as device "local".
Web console: http://${DEBFLEET_WEB_LISTEN:-127.0.0.1:8088} (sign in as demo, password $password)
Try, in another terminal:
  export DEBFLEET_BROKER=mqtt://$LISTEN
  target/debug/debfleet devices
  target/debug/debfleet show local
  target/debug/debfleet ping --all
  target/debug/debfleet cfg set local telemetry.cpu.interval_s=2
  target/debug/debfleet component call local led-strip rainbow-cycle wait_ms=20
  target/debug/debfleet component frames local led-strip
  target/debug/debfleet watch
Ctrl-C here stops them all.

TOUR
wait $serve
