#!/usr/bin/env bash
# Package deltas against debdelta, pair by pair, in one run: delta bytes (ours vs `debdelta`),
# apply time (ours vs `debpatch` from the old .deb), peak memory of our apply, and a check that
# the rebuilt package has the new one's files byte for byte (`dpkg-deb --fsys-tarfile`).
#
#   bench/delta.sh [PAIRS]
#
# PAIRS is a file with one "OLD.deb NEW.deb" per line, or a directory of .debs in which every
# package's versions are paired oldest to newest (default: ../shared/bench/delta-pairs).
# Goals (issue 11): total bytes <= 0.8x debdelta's and <= 1.0x on every pair; apply <= 0.1x
# debpatch's time; apply peak memory <= 64 MiB. Installs debdelta (and the bsdiff it runs) when
# missing (as root).
# Then our diff engine against bidiff on the same data, and index diffs: what `apt-get update` fetches after one publish into a suite of N (default
# 5,000) packages, against the full Packages.xz (goal <= 2%). PAIRS_ONLY=1 skips that part.
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=$(realpath "${1:-../shared/bench/delta-pairs}")
ROUNDS=${ROUNDS:-3}
if ! command -v debdelta >/dev/null || ! command -v bsdiff >/dev/null; then
    [ "$(id -u)" -eq 0 ] || { echo "needs debdelta and bsdiff: run as root or install them" >&2; exit 1; }
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debdelta bsdiff >/dev/null
fi
cargo build --release -p debfleet-console -p debfleet-repo >&2
BIN=$PWD/target/release/debfleet
work=$(mktemp -d)
server=
trap 'kill $server 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

list=$work/pairs
if [ -d "$PAIRS" ]; then
    # Group by package name (the part before the first _), sort versions the Debian way.
    for name in $(ls "$PAIRS"/*.deb | xargs -n1 basename | cut -d_ -f1 | sort -u); do
        files=$(for f in "$PAIRS/${name}"_*.deb; do printf '%s %s\n' "$(dpkg-deb -f "$f" Version)" "$f"; done |
            sort -t' ' -k1,1V | while read -r v f; do echo "$v $f"; done)
        prev=""
        while read -r v f; do
            [ -n "$prev" ] && dpkg --compare-versions "$(dpkg-deb -f "$prev" Version)" lt "$v" && echo "$prev $f"
            prev=$f
        done <<<"$files"
    done >"$list"
else
    cp "$PAIRS" "$list"
fi

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b > 0 ? a / b : 0) }'; }

printf '%-34s %10s %10s %10s %7s %9s %9s %7s %9s %s\n' pair new.deb debdelta ours ratio debpatch_s apply_s ratio peak_MiB identical
tot_ours=0; tot_dd=0; worst=0; worst_apply=0; worst_mem=0; all_identical=yes
while read -r old new; do
    [ -n "$old" ] || continue
    label=$(dpkg-deb -f "$new" Package)" $(dpkg-deb -f "$old" Version)->$(dpkg-deb -f "$new" Version)"
    rm -f "$work/dd"; debdelta "$old" "$new" "$work/dd" >/dev/null 2>&1 || true
    "$BIN" delta make "$old" "$new" -o "$work/ours" >/dev/null
    dd=$(stat -c %s "$work/dd"); ours=$(stat -c %s "$work/ours"); size=$(stat -c %s "$new")
    times_dp=(); times_us=(); mem=0
    for _ in $(seq "$ROUNDS"); do
        rm -f "$work/dp.deb" "$work/us.deb"
        t=$(now); debpatch -A "$work/dd" "$old" "$work/dp.deb" >/dev/null 2>&1; times_dp+=("$(echo "$(now) - $t" | bc)")
        t=$(now); /usr/bin/time -f %M -o "$work/mem" "$BIN" delta apply "$old" "$work/ours" -o "$work/us.deb" >/dev/null
        times_us+=("$(echo "$(now) - $t" | bc)")
        m=$(cat "$work/mem"); [ "$m" -gt "$mem" ] && mem=$m
    done
    dp=$(printf '%s\n' "${times_dp[@]}" | median); us=$(printf '%s\n' "${times_us[@]}" | median)
    if cmp -s <(dpkg-deb --fsys-tarfile "$new") <(dpkg-deb --fsys-tarfile "$work/us.deb") &&
        [ "$(dpkg-deb -f "$new")" = "$(dpkg-deb -f "$work/us.deb")" ]; then same=yes; else same=NO; all_identical=no; fi
    r=$(ratio "$ours" "$dd"); ra=$(ratio "$us" "$dp"); mib=$(awk -v k="$mem" 'BEGIN { printf "%.1f", k / 1024 }')
    printf '%-34s %10d %10d %10d %7s %9.2f %9.3f %7s %9s %s\n' "$label" "$size" "$dd" "$ours" "$r" "$dp" "$us" "$ra" "$mib" "$same"
    tot_ours=$((tot_ours + ours)); tot_dd=$((tot_dd + dd))
    worst=$(awk -v a="$worst" -v b="$r" 'BEGIN { print (b > a ? b : a) }')
    worst_apply=$(awk -v a="$worst_apply" -v b="$ra" 'BEGIN { print (b > a ? b : a) }')
    worst_mem=$(awk -v a="$worst_mem" -v b="$mib" 'BEGIN { print (b > a ? b : a) }')
done <"$list"
echo
echo "total: ours $tot_ours bytes, debdelta $tot_dd bytes: $(ratio "$tot_ours" "$tot_dd")x (goal <= 0.8x)"
echo "worst pair: ${worst}x debdelta's bytes (goal <= 1.0x)"
echo "worst apply: ${worst_apply}x debpatch's time (goal <= 0.1x); peak memory ${worst_mem} MiB (goal <= 64)"
echo "rebuilt packages identical to the new ones (files and control fields): $all_identical"


# The other diff engine the issue names, on the same expanded data (decision 0004).
echo
cargo build --release -p debfleet-delta --features bench-bidiff --example engines >&2
args=()
while read -r old new; do [ -n "$old" ] && args+=("$old" "$new"); done <"$list"
target/release/examples/engines "${args[@]}"

[ "${PAIRS_ONLY:-0}" = 1 ] && exit 0

# Index diffs after one publish into a suite of N packages (same generated packages as
# bench/repo-publish.sh, cached).
N=${N:-5000}
REPO=$PWD/target/release/debfleet-repo
source bench/bench-debs.sh
"$REPO" init --root "$work/repo" > "$work/init.out"
token=$(tail -1 "$work/init.out")
"$REPO" import --root "$work/repo" --suite stable "$cache"/debs/*.deb >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$REPO" serve --root "$work/repo" --listen "127.0.0.1:$port" 2>/dev/null &
server=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
publish() {
    local d; d=$(mktemp -d); mkdir -p "$d/DEBIAN" "$d/usr/share/$1"; echo "$1" > "$d/usr/share/$1/id"
    printf "Package: %s\nVersion: 1.0\nArchitecture: all\nMaintainer: Bench <bench@example.com>\nDescription: one more\n" "$1" > "$d/DEBIAN/control"
    dpkg-deb --build --root-owner-group -Zgzip "$d" "$work/$1.deb" >/dev/null; rm -rf "$d"
    "$BIN" publish --suite stable --repo "http://127.0.0.1:$port" --token "$token" "$work/$1.deb" >/dev/null
}
a=$work/apt
mkdir -p "$a/etc/apt/apt.conf.d" "$a/etc/apt/preferences.d" "$a/etc/apt/sources.list.d" "$a/var/lib/apt/lists/partial" \
    "$a/var/cache/apt/archives/partial" "$a/var/lib/dpkg"
: > "$a/var/lib/dpkg/status"
"$REPO" export-key --root "$work/repo" > "$work/key.gpg"
echo "deb [signed-by=$work/key.gpg] http://127.0.0.1:$port/ stable main" > "$a/etc/apt/sources.list"
update() {
    apt-get -q -o Dir="$a" -o Dir::State::status="$a/var/lib/dpkg/status" -o Debug::NoLocking=1 \
        -o APT::Architecture=amd64 -o Acquire::GzipIndexes=false -o APT::Update::Error-Mode=any update 2>&1
}
publish bench-first
update >/dev/null
publish bench-second
out=$(update)
fetched=$(echo "$out" | awk '/^Fetched/ { gsub(",", "", $2); v = $2; u = $3; if (u == "kB") v *= 1000; if (u == "MB") v *= 1000000; print int(v) }')
fetched=${fetched:-0}
full=$(stat -c %s "$work/repo/public/dists/stable/main/binary-amd64/Packages.xz")
used=$(echo "$out" | grep -c 'Packages.diff' || true)
same=$(cmp -s "$work/repo/public/dists/stable/main/binary-amd64/Packages" "$a"/var/lib/apt/lists/*binary-amd64_Packages && echo yes || echo NO)
echo
echo "index update after one publish into $N packages: fetched $fetched bytes (InRelease, Packages.diff/Index, one patch,"
echo "  Deltas) against the full Packages.xz $full bytes: $(ratio "$fetched" "$full")x (goal <= 0.02); index diffs used: $([ "$used" -gt 0 ] && echo yes || echo NO);"
echo "  lists identical to the served Packages: $same"
