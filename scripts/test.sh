#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests need (Mosquitto, Chromium, ROS 1...) when
# missing, as root.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
have mosquitto || need+=(mosquitto)
have openssl || need+=(openssl)
have lintian || need+=(lintian)
# `debfleet monitor` is tested in a real terminal.
have tmux || need+=(tmux)
# Devices in tests are systemd-nspawn containers booted from a debootstrapped rootfs.
have systemd-nspawn || need+=(systemd-container)
have debootstrap || need+=(debootstrap)
# The web console's tests drive Debian's Chromium over WebDriver.
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
# The ROS bridge's tests run Debian's ROS 1: a real rosmaster, rostopic, and the message
# packages rostopic needs for the types the tests publish and echo.
have rosmaster || need+=(python3-rosmaster)
have rostopic || need+=(python3-rostopic)
have rosnode || need+=(python3-rosnode)
for p in python3-rospy python3-geometry-msgs python3-nav-msgs python3-sensor-msgs python3-std-srvs; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "The tests need: ${need[*]}. Run this as root (it installs them), or: sudo apt-get install ${need[*]}" >&2
        exit 1
    fi
    echo "installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The end-to-end tests drive the real binaries and install the real packages, so build both first.
cargo build --workspace --bins
bash scripts/build-debs.sh
# The console remembers what it found per broker (in the cache directory); test brokers come and
# go on random ports, so the suite gets a cache of its own.
XDG_CACHE_HOME=$(mktemp -d)
export XDG_CACHE_HOME
trap 'rm -rf "$XDG_CACHE_HOME"' EXIT
cargo test --workspace "$@"
