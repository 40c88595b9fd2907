# Sourced by the repository benchmarks: makes N small packages with dpkg-deb once, cached in
# $cache (BENCH_CACHE, default /tmp/debfleet-bench-debs-N): $cache/debs/*.deb.
cache=${BENCH_CACHE:-/tmp/debfleet-bench-debs-$N}
if [ ! -f "$cache/.complete" ]; then
    echo "generating $N small packages with dpkg-deb (cached in $cache)..." >&2
    rm -rf "$cache" && mkdir -p "$cache/debs"
    seq 1 "$N" | xargs -P "$(nproc)" -I{} sh -c '
        d=$(mktemp -d); mkdir -p "$d/DEBIAN" "$d/usr/share/bench-pkg-{}"
        echo {} > "$d/usr/share/bench-pkg-{}/id"
        printf "Package: bench-pkg-{}\nVersion: 1.0-1\nArchitecture: all\nMaintainer: Bench <bench@example.com>\nDescription: benchmark package {}\n generated for the repository benchmark\n" > "$d/DEBIAN/control"
        dpkg-deb --build --root-owner-group -Zgzip "$d" "'"$cache"'/debs/bench-pkg-{}_1.0-1_all.deb" >/dev/null
        rm -rf "$d"' || true
    made=$(find "$cache/debs" -name '*.deb' | wc -l)
    [ "$made" -eq "$N" ] || { echo "only $made of $N packages were built" >&2; exit 1; }
    touch "$cache/.complete"
fi
