//! The diff engines side by side on the data of real package pairs (decision 0004): ours
//! (qbsdiff matches, three zstd streams, the base as the new bytes' reference) against bidiff
//! (its patch stream, compressed with zstd at the same level), both over the same expanded
//! payload. Run by `bench/delta.sh`:
//!
//!   cargo run --release -p debfleet-delta --features bench-bidiff --example engines -- OLD NEW...

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!(
        "{:<34} {:>10} {:>10} {:>7} {:>8} {:>8}",
        "pair (data.tar only)", "ours", "bidiff", "ratio", "ours_s", "bidiff_s"
    );
    let (mut ours_total, mut bi_total) = (0usize, 0usize);
    for pair in args.chunks(2) {
        let [old, new] = pair else { break };
        let (o, n) = (std::fs::read(old).expect("old .deb"), std::fs::read(new).expect("new .deb"));
        let (o, n) = (debfleet_delta::read_payload(&o).expect("old"), debfleet_delta::read_payload(&n).expect("new"));
        let base = debfleet_delta::expand::expand_base(&o.data.bytes);
        let (target, _) = debfleet_delta::expand::expand_target(&n.data.bytes);
        let t = std::time::Instant::now();
        let ours = debfleet_delta::diff::make(&base, &target).expect("our diff").len();
        let ours_s = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let mut raw = Vec::new();
        bidiff::simple_diff(&base, &target, &mut raw).expect("bidiff");
        let bi = zstd::bulk::compress(&raw, 22).expect("zstd").len();
        let bi_s = t.elapsed().as_secs_f64();
        let name = std::path::Path::new(new).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let name: String = name.chars().take(34).collect();
        println!("{name:<34} {ours:>10} {bi:>10} {:>7.3} {ours_s:>8.2} {bi_s:>8.2}", ours as f64 / bi as f64);
        ours_total += ours;
        bi_total += bi;
    }
    println!(
        "total: ours {ours_total} bytes, bidiff {bi_total} bytes: {:.3}x",
        ours_total as f64 / bi_total.max(1) as f64
    );
}
