#!/usr/bin/env bash
# Builds debfleet's own packages (debfleet-agent, debfleet-repo, debfleet, and the components:
# debfleet-led-strip, debfleet-projector, debfleet-ros-bridge, debfleet-robot-sample, and
# debfleet-sim-robot) into OUT (default
# target/debs). Reproducible: the timestamp is the last commit's (SOURCE_DATE_EPOCH), so the
# same source gives byte-identical .debs.
#   scripts/build-debs.sh [--version V] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/debs
version_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --version) version_args=(--version "$2"); shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) echo "usage: $0 [--version V] [--out DIR]" >&2; exit 2 ;;
    esac
done
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
cargo build --release --bins -p debfleet-repo -p debfleet-console
# The agent is built for size and statically linked: it runs on small boards. Components run
# on the same boards: built the same way, on their own so their dependencies' features never
# change the agent's build.
scripts/build-device.sh debfleet-agent debfleet-agent debfleet-fetch
scripts/build-device.sh debfleet-led-strip debfleet-led-strip
scripts/build-device.sh debfleet-projector debfleet-projector
scripts/build-device.sh debfleet-ros-bridge debfleet-ros-bridge
scripts/build-device.sh debfleet-robot-sample debfleet-robot-sample debfleet-sim-robot
# Man pages and completions, generated from the programs' own command-line definitions.
mkdir -p target/man
target/release/debfleet manpages --out target/man >/dev/null
target/release/debfleet-repo manpage > target/man/debfleet-repo.1
target/release/debfleet completions bash > target/man/debfleet.bash
gzip -9nf target/man/debfleet.1 target/man/debfleet-agent.1 target/man/debfleet-repo.1
for manifest in packaging/debfleet-agent packaging/debfleet-repo packaging/debfleet components/led-strip/package \
    components/projector/package components/ros-bridge/package components/robot-sample/package \
    components/robot-sample/sim-package; do
    target/release/debfleet package "$manifest/manifest.toml" --out "$out" \
        --arch "$(dpkg --print-architecture)" "${version_args[@]}"
done
