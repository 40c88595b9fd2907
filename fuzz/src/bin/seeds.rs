//! Writes the generated seeds `bench/fuzz.sh` adds to the corpora in `fuzz/corpus/` (the delta
//! seeds: real deltas between two small packages, made by the delta crate's own `make`).
fn main() {
    let out = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: seeds DIR"));
    let base: &[u8] = include_bytes!("../../corpus/delta-base.deb");
    let new: &[u8] = include_bytes!("../../corpus/delta-new.deb");
    std::fs::create_dir_all(out.join("delta")).unwrap();
    std::fs::write(out.join("delta/changed"), debfleet_delta::make(base, new).unwrap()).unwrap();
    std::fs::write(out.join("delta/same"), debfleet_delta::make(base, base).unwrap()).unwrap();
}
