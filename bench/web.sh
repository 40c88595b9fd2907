#!/usr/bin/env bash
# The web console's fleet page with DEVICES (default 10,000) simulated devices retained on a real
# Mosquitto, served by the release `debfleet web` and loaded in headless Chromium: the server's
# time to answer, the browser's time to a rendered page (goal: under 1 s), a live update's
# latency (the table not rendered again), and the server's memory per device against the same
# server on an empty broker in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
for p in mosquitto:mosquitto chromium:chromium chromedriver:chromium-driver; do
    command -v "${p%%:*}" >/dev/null || [ -x "/usr/sbin/${p%%:*}" ] || {
        echo "needs ${p#*:} (apt-get install ${p#*:})" >&2
        exit 1
    }
done
cargo build --release -p debfleet-console
export DEBFLEET_BIN=$PWD/target/release/debfleet
# shellcheck source=bench/lib.sh
. bench/lib.sh
run_test_bench web
