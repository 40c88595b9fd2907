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
# shellcheck source=bench/lib.sh
. bench/lib.sh
run_test_bench rollout
