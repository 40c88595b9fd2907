#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests need (Mosquitto) when missing, as root.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || need+=(mosquitto)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "The tests need: ${need[*]}. Run this as root (it installs them), or: sudo apt-get install ${need[*]}" >&2
        exit 1
    fi
    echo "installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The end-to-end tests drive the real binaries, so build them first.
cargo build --workspace --bins
cargo test --workspace "$@"
