#!/usr/bin/env bash
# Bytes on the wire per device (tcpdump on each agent's broker port): first connect, idle
# projected to a month, one ping, one reconnect, one install — the agent before issue 12
# (BASELINE, a git revision; `none` to skip) beside this one with the default and the cellular
# profile, in the same run. See tests/benches/wire.rs. DURATION: idle seconds (3600), measured
# once every agent has sent its first telemetry (the cellular one's 5 minutes after its start).
# INSTALL=0 skips the install on lab devices (which needs root and systemd-nspawn); INSTALL_ONLY=1
# measures only the install.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v tcpdump >/dev/null || need+=(tcpdump)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
# The install is measured on lab devices (systemd-nspawn containers from a debootstrapped rootfs).
if [ "${INSTALL:-1}" != 0 ]; then
    command -v systemd-nspawn >/dev/null || need+=(systemd-container)
    command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
fi
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
BASELINE=${BASELINE:-5bf421d}
mkdir -p target/wire
if [ "$BASELINE" != none ]; then
    # The baseline's sources in a target directory of their own: cargo names workspace crates by
    # their path inside the workspace and judges freshness by file times, so in this tree's
    # target directory the (older) baseline sources would reuse this tree's crates.
    src=target/wire/baseline-src
    rm -rf "$src" && mkdir -p "$src"
    git archive "$BASELINE" | tar -x -C "$src"
    cargo build --profile agent -p debfleet-agent --manifest-path "$src/Cargo.toml" --target-dir target/wire/baseline-target
    cp target/wire/baseline-target/agent/debfleet-agent target/wire/baseline-agent
    export BASELINE_AGENT_BIN=$PWD/target/wire/baseline-agent
fi
# The agent as users get it (the size profile, as in the package), and the packages for the
# install on lab devices.
bash scripts/build-debs.sh >/dev/null
export DEBFLEET_AGENT_BIN=$PWD/target/agent/debfleet-agent
# Run outside cargo, so a build meanwhile does not wait on cargo's lock for the hours this takes.
bench=$(cargo bench -p debfleet-tests --bench wire --no-run --message-format=json \
    | grep -o '"executable":"[^"]*"' | tail -n 1 | cut -d '"' -f 4)
exec "$bench" --bench
