#!/usr/bin/env bash
# Coverage-guided fuzzing of debfleet's parsers with AFL++ on the stable toolchain: the targets in
# fuzz/src/bin are built with rustc's own coverage instrumentation (sancov trace-pc-guard and
# compare tracing) linked against Debian's AFL++ runtime, then each runs under afl-fuzz for
# DURATION seconds (default 300), JOBS at a time (default: the number of cores). Prints
# executions, speed, paths and crashes per target against the goal of 10 M executions with no
# crash; a crash is copied to fuzz/crashes/TARGET/ (make it a regression test) and the script
# exits 1. TARGETS="command topic" runs only those.
#   DURATION=600 bash bench/fuzz.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-300}
JOBS=${JOBS:-$(nproc)}
ALL="command topic cfg_patch desired deb_upload delta component_frame session_frame"
TARGETS=${TARGETS:-$ALL}
GOAL=10000000

if ! command -v afl-fuzz >/dev/null || [ ! -e /usr/lib/afl/afl-compiler-rt.o ]; then
    [ "$(id -u)" = 0 ] || { echo "afl++ is missing: run as root (it installs it) or apt-get install afl++" >&2; exit 2; }
    apt-get install -y -q afl++ >/dev/null
fi

# The flags cargo-afl uses, with Debian's runtime instead of one it builds (its afl-compiler-rt
# implements the sancov callbacks and the persistent loop).
export RUSTFLAGS="-C debug-assertions -C overflow-checks -C passes=sancov-module -C codegen-units=1 \
-C llvm-args=-sanitizer-coverage-level=3 -C llvm-args=-sanitizer-coverage-trace-pc-guard \
-C llvm-args=-sanitizer-coverage-prune-blocks=0 -C llvm-args=-sanitizer-coverage-trace-compares \
-C opt-level=3 --cfg fuzzing -C link-arg=/usr/lib/afl/afl-compiler-rt.o"
cargo build --release --manifest-path fuzz/Cargo.toml --target-dir target/fuzz --bins
unset RUSTFLAGS
bin=target/fuzz/release

work=target/fuzz-runs/$(date +%Y%m%d-%H%M%S)
mkdir -p "$work"
"$bin/seeds" "$work/seeds"

export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
run_one() {
    local t=$1 in="$work/$1.in"
    mkdir -p "$in"
    cp fuzz/corpus/"$t"/* "$in"/ 2>/dev/null || true
    cp "$work"/seeds/"$t"/* "$in"/ 2>/dev/null || true
    afl-fuzz -i "$in" -o "$work/$t.out" -V "$DURATION" -t 1000 -m none -- "$bin/$t" >"$work/$t.log" 2>&1 || {
        echo "afl-fuzz failed for $t; see $work/$t.log" >&2; tail -20 "$work/$t.log" >&2; return 1; }
}
running=0
for t in $TARGETS; do
    run_one "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
done
wait

stat() { grep "^$2 " "$work/$1.out/default/fuzzer_stats" | sed 's/.*: //'; }
status=0
printf '%-16s %14s %10s %8s %8s %s\n' TARGET EXECUTIONS EXEC/S PATHS CRASHES "VS GOAL (10 M, no crash)"
for t in $TARGETS; do
    execs=$(stat "$t" execs_done); speed=$(stat "$t" execs_per_sec); paths=$(stat "$t" corpus_count)
    crashes=$(stat "$t" saved_crashes)
    ratio=$(awk -v e="$execs" -v g=$GOAL 'BEGIN { printf "%.2fx", e / g }')
    printf '%-16s %14s %10s %8s %8s %s\n' "$t" "$execs" "$speed" "$paths" "$crashes" "$ratio"
    if [ "$crashes" != 0 ]; then
        mkdir -p fuzz/crashes/"$t"
        cp "$work/$t.out"/default/crashes/id* fuzz/crashes/"$t"/
        status=1
    fi
done
echo "($DURATION s per target, $JOBS at a time, on $(nproc) cores; runs in $work)"
exit $status
