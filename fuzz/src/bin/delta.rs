//! The delta format: a device applies what it downloaded to the package it has. Whatever comes
//! out must be what the delta's header promised (apply checks the result's hash).
const BASE: &[u8] = include_bytes!("../../corpus/delta-base.deb");

fn target(input: &[u8]) {
    let _ = debfleet_delta::open(input);
    if let Ok((header, out)) = debfleet_delta::apply(BASE, input) {
        let _ = (header, out.len());
    }
}

fn main() {
    debfleet_fuzz::run(target);
}
