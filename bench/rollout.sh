#!/usr/bin/env bash
# A rollout over DEVICES (default 1000) simulated devices, each its own MQTT connection from one
# process answering like an agent (FAIL_PCT per hundred fail), with a real Mosquitto and the
# release `debfleet rollout run`; against a plain `debfleet upgrade --group` of the same devices
# in the same run. Prints the controller's CPU and peak memory, the time from a wave's last
# result to the next wave's first record, and broker messages per device.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || {
    echo "needs mosquitto (apt-get install mosquitto)" >&2
    exit 1
}
# One connection per device, on both ends.
ulimit -n 16384
cargo build --release -p debfleet-console
export DEBFLEET_BIN=$PWD/target/release/debfleet
XDG_CACHE_HOME=$(mktemp -d)
export XDG_CACHE_HOME
trap 'rm -rf "$XDG_CACHE_HOME"' EXIT
bench=$(cargo bench -p debfleet-tests --bench rollout --no-run --message-format=json \
    | grep -o '"executable":"[^"]*"' | tail -n 1 | cut -d '"' -f 4)
"$bench" --bench
