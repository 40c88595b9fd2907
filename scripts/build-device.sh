#!/usr/bin/env bash
# Builds programs that run on devices the way users get them: the size profile (`agent` in
# Cargo.toml) and statically linked, so a process maps no libc.so, ld.so or libgcc_s and holds
# only the libc code it uses (decision 0010: 5.0 MiB resident became 4.3 MiB for the agent).
#   scripts/build-device.sh PACKAGE BIN [BIN...]
# Every device build goes through here: `cargo build --profile agent` would link the same
# binaries dynamically (the static flag is given to the final link only, so the dependencies
# are shared with that build and nothing else is rebuilt).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 PACKAGE BIN [BIN...]" >&2; exit 2; }
package=$1
shift
for bin in "$@"; do
    cargo rustc --quiet --profile agent -p "$package" --bin "$bin" -- -C target-feature=+crt-static
done
