#!/usr/bin/env bash
# Remote sessions against ssh into the same lab device, in the same run: keystroke-to-echo
# latency, 50 MB of output, forward throughput, and the agent's memory at rest and during the
# sessions (goals: under 5 MiB at rest, a session adds under 1 MiB). Boots a lab device
# (systemd-nspawn, as root), installs Debian's openssh-server in it, and measures the agent
# users get (the .deb from scripts/build-debs.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
for p in mosquitto:mosquitto ssh:openssh-client ssh-keygen:openssh-client; do
    command -v "${p%%:*}" >/dev/null || [ -x "/usr/sbin/${p%%:*}" ] || {
        echo "needs ${p#*:} (apt-get install ${p#*:})" >&2
        exit 1
    }
done
bash scripts/build-debs.sh >/dev/null
cargo build --release -p debfleet-console
# shellcheck source=bench/lib.sh
. bench/lib.sh
run_test_bench remote
