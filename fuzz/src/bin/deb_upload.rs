//! The repository's upload parser (ar container, control archive in every compression, the
//! control paragraph), the code `debfleet-repo` runs on every upload, included from its source.
#[allow(dead_code, unused_imports)]
#[path = "../../../repo-server/src/control.rs"]
mod control;
#[allow(dead_code, unused_imports)]
#[path = "../../../repo-server/src/deb.rs"]
mod deb;

fn target(input: &[u8]) {
    let _ = deb::read_control(std::io::Cursor::new(input));
}

fn main() {
    debfleet_fuzz::run(target);
}
