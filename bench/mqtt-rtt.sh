#!/usr/bin/env bash
# A command's round trip through the agent against a raw publish/reply through the same broker
# (see tests/benches/mqtt_rtt.rs). Needs mosquitto (scripts/test.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
# The agent as users get it: built as the package is (size profile, static).
scripts/build-device.sh debfleet-agent debfleet-agent
DEBFLEET_AGENT_BIN=$PWD/target/agent/debfleet-agent exec cargo bench -p debfleet-tests --bench mqtt-rtt
