#!/usr/bin/env bash
# debfleet install vs plain apt-get install on the same lab device (see tests/benches/agent_install.rs).
# Needs root (systemd-nspawn) and what scripts/test.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
bash scripts/build-debs.sh >/dev/null
exec cargo bench -p debfleet-tests --bench agent-install
