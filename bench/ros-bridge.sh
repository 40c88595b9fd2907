#!/usr/bin/env bash
# The ROS bridge's throughput and cost: a 100 Hz nav_msgs/Odometry stream decimated to 1 Hz —
# the bridge's CPU and memory (goals: at most 5 % of a core and 8 MiB) — and the latency from
# the ROS publish to the MQTT delivery (goal: p99 at most 20 ms), beside rostopic echo's own
# latency in the same run. Uses Debian's ROS 1 (rosmaster, rostopic) and the bridge and agent
# users get (the .debs' static binaries from scripts/build-debs.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
for p in mosquitto:mosquitto rosmaster:python3-rosmaster rostopic:python3-rostopic; do
    command -v "${p%%:*}" >/dev/null || [ -x "/usr/sbin/${p%%:*}" ] || {
        echo "needs ${p#*:} (apt-get install ${p#*:} python3-nav-msgs)" >&2
        exit 1
    }
done
bash scripts/build-debs.sh >/dev/null
cargo build --release -p debfleet-console
DEBFLEET_AGENT_BIN=$PWD/target/agent/debfleet-agent
DEBFLEET_ROS_BRIDGE_BIN=$PWD/target/agent/debfleet-ros-bridge
export DEBFLEET_AGENT_BIN DEBFLEET_ROS_BRIDGE_BIN
# shellcheck source=bench/lib.sh
. bench/lib.sh
run_test_bench ros-bridge
