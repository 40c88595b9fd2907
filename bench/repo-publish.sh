#!/usr/bin/env bash
# Publishing one .deb into a repository of N (default 5000) small packages, against regenerating
# the same repository with apt-ftparchive (cold, and warm with its cache database) and adding the
# same .deb with reprepro includedeb, all in one run. Prints the times and the ratios.
# Installs apt-utils and reprepro when missing (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-5000}
ROUNDS=${ROUNDS:-5}
need=()
command -v apt-ftparchive >/dev/null || need+=(apt-utils)
command -v reprepro >/dev/null || need+=(reprepro)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || { echo "needs ${need[*]}: run as root or install them" >&2; exit 1; }
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release -p debfleet-repo
BIN=$PWD/target/release/debfleet-repo
source bench/bench-debs.sh
work=$(mktemp -d)
trap 'kill $server 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
server=
ms() { echo $(( $(date +%s%N) / 1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
extra() { # a fresh package, not among the N
    local d; d=$(mktemp -d); mkdir -p "$d/DEBIAN" "$d/usr/share/extra-$1"; echo "$1" > "$d/usr/share/extra-$1/id"
    printf "Package: extra-%s\nVersion: 1.0\nArchitecture: all\nMaintainer: Bench <bench@example.com>\nDescription: one more\n" "$1" > "$d/DEBIAN/control"
    dpkg-deb --build --root-owner-group -Zgzip "$d" "$work/extra-$1.deb" >/dev/null; rm -rf "$d"
}

# debfleet-repo: N packages imported once, then timed publishes of one more through the API.
$BIN init --root "$work/df" --retention 5 > "$work/init.out"
token=$(tail -1 "$work/init.out")
$BIN import --root "$work/df" --suite stable "$cache"/debs/*.deb >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
$BIN serve --root "$work/df" --listen "127.0.0.1:$port" 2>/dev/null &
server=$!
for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$port/dists/stable/InRelease" && break; sleep 0.1; done
df_times=()
for i in $(seq "$ROUNDS"); do
    extra "df$i"
    t0=$(ms)
    curl -sf -X POST -H "Authorization: Bearer $token" --data-binary @"$work/extra-df$i.deb" "http://127.0.0.1:$port/api/v1/suites/stable/packages" >/dev/null
    df_times+=($(( $(ms) - t0 )))
done
df=$(printf '%s\n' "${df_times[@]}" | median)

# apt-ftparchive regenerating the same repository (N + the extra packages): indices + Release.
ftp_repo() {
    local out=$1 db=$2
    mkdir -p "$out/dists/stable/main/binary-all"
    (cd "$work/df/public" && apt-ftparchive ${db:+--db "$db"} packages pool) > "$out/dists/stable/main/binary-all/Packages"
    gzip -6 -k "$out/dists/stable/main/binary-all/Packages"
    xz -6 -k "$out/dists/stable/main/binary-all/Packages"
    apt-ftparchive release "$out/dists/stable" > "$out/Release"
}
t0=$(ms); ftp_repo "$work/ftp-cold" ""; ftp_cold=$(( $(ms) - t0 ))
ftp_repo "$work/ftp-warm0" "$work/ftp.db"
t0=$(ms); ftp_repo "$work/ftp-warm" "$work/ftp.db"; ftp_warm=$(( $(ms) - t0 ))

# reprepro: the same N packages, then timed includedeb of one more.
mkdir -p "$work/rr/conf"
printf 'Codename: stable\nArchitectures: amd64 arm64 armhf\nComponents: main\n' > "$work/rr/conf/distributions"
reprepro -b "$work/rr" -S misc -P optional --export=silent-never includedeb stable "$cache"/debs/*.deb >/dev/null 2>&1
reprepro -b "$work/rr" export stable >/dev/null 2>&1
rr_times=()
for i in $(seq "$ROUNDS"); do
    extra "rr$i"
    t0=$(ms)
    reprepro -b "$work/rr" -S misc -P optional includedeb stable "$work/extra-rr$i.deb" >/dev/null 2>&1
    rr_times+=($(( $(ms) - t0 )))
done
rr=$(printf '%s\n' "${rr_times[@]}" | median)

best=$ftp_cold; for t in $ftp_warm $rr; do [ "$t" -lt "$best" ] && best=$t; done
echo "repository of $N packages; medians of $ROUNDS publishes"
printf '%-52s %8s ms\n' "debfleet-repo: publish one .deb (upload+index+sign)" "$df"
printf '%-52s %8s ms\n' "apt-ftparchive: regenerate, cold" "$ftp_cold"
printf '%-52s %8s ms\n' "apt-ftparchive: regenerate, warm cache db" "$ftp_warm"
printf '%-52s %8s ms\n' "reprepro: includedeb one .deb (unsigned)" "$rr"
awk -v d="$df" -v b="$best" -v c="$ftp_cold" -v w="$ftp_warm" -v r="$rr" 'BEGIN {
    printf "ratio debfleet / apt-ftparchive cold %.3fx, / warm %.3fx, / reprepro %.3fx; / best %.3fx (goal < 0.2x)\n", d/c, d/w, d/r, d/b }'
