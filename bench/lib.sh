# Shared by the benchmark scripts: sourced, not run.

# Builds the debfleet-tests benchmark NAME and runs it, with a console cache of its own (the
# console remembers what it found per broker; benchmark brokers come and go on random ports).
run_test_bench() {
    XDG_CACHE_HOME=$(mktemp -d)
    export XDG_CACHE_HOME
    trap 'rm -rf "$XDG_CACHE_HOME"' EXIT
    local bench
    bench=$(cargo bench -p debfleet-tests --bench "$1" --no-run --message-format=json \
        | grep -o '"executable":"[^"]*"' | tail -n 1 | cut -d '"' -f 4)
    "$bench" --bench
}
