//! Writes a suite's `dists/` tree from its entries: Packages (plain, gz, xz) per architecture with
//! `Architecture: all` packages in every one, content-addressed `by-hash` copies, and the signed
//! Release. Nothing here reads a .deb: stanzas come from the entries.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use crate::control::ARCHES;
use crate::fsutil::{failpoint, sha256_hex, write_atomic};
use crate::signing::Signer;
use crate::store::{Entry, RepoConfig};

pub const GENERATION_FIELD: &str = "X-Debfleet-Generation";

fn stanza(e: &Entry, out: &mut String) {
    out.push_str(&e.control.to_string());
    let _ = writeln!(out, "Filename: {}\nSize: {}\nSHA256: {}\n", e.filename, e.size, e.sha256);
}

/// The Packages text for one architecture, sorted by name and version.
pub fn packages_text(entries: &[Entry], arch: &str) -> String {
    let mut chosen: Vec<&Entry> = entries.iter().filter(|e| e.arch == arch || e.arch == "all").collect();
    chosen.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.version_cmp(b)).then_with(|| a.arch.cmp(&b.arch)));
    let mut out = String::with_capacity(chosen.len() * 600);
    for e in chosen {
        stanza(e, &mut out);
    }
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    enc.write_all(data).expect("in-memory write");
    enc.finish().expect("in-memory write")
}

fn xz(data: &[u8], preset: u32) -> Vec<u8> {
    let mut enc = xz2::write::XzEncoder::new(Vec::new(), preset);
    enc.write_all(data).expect("in-memory write");
    enc.finish().expect("in-memory write")
}

/// Writes the indices and the signed Release; returns the by-hash files it references
/// (relative to the suite directory) so older ones can be collected later.
pub fn write_suite(
    public: &Path,
    suite: &str,
    generation: u64,
    entries: &[Entry],
    cfg: &RepoConfig,
    signer: &Signer,
) -> Result<Vec<String>> {
    let dir = public.join("dists").join(suite);
    // Compress the three architectures in parallel: xz dominates the cost of a publish.
    let files: Vec<(String, Vec<u8>)> = std::thread::scope(|s| {
        let handles: Vec<_> = ARCHES
            .iter()
            .map(|arch| {
                s.spawn(move || {
                    let text = packages_text(entries, arch).into_bytes();
                    let base = format!("main/binary-{arch}/Packages");
                    let gz = gzip(&text);
                    let xz = xz(&text, cfg.xz_preset);
                    vec![(format!("{base}.gz"), gz), (format!("{base}.xz"), xz), (base, text)]
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("index thread")).collect()
    });
    let mut release_lines = String::new();
    let mut by_hash = Vec::new();
    // Immutable, content-addressed copies first: a client holding the old Release still finds
    // the old ones, and one that gets the new Release finds the new ones.
    for (rel, bytes) in &files {
        let sha = sha256_hex(bytes);
        let parent = Path::new(rel).parent().expect("has a parent").to_string_lossy().into_owned();
        let hashed = format!("{parent}/by-hash/SHA256/{sha}");
        let path = dir.join(&hashed);
        if !path.exists() {
            write_atomic(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        }
        by_hash.push(hashed);
        let _ = writeln!(release_lines, " {sha} {} {rel}", bytes.len());
    }
    failpoint("after-by-hash");
    for (rel, bytes) in &files {
        write_atomic(&dir.join(rel), bytes)?;
    }
    let date = httpdate::fmt_http_date(std::time::SystemTime::now()).replace("GMT", "UTC");
    let release = format!(
        "Origin: {origin}\nLabel: {label}\nSuite: {suite}\nCodename: {suite}\nDate: {date}\nArchitectures: {arches}\nNo-Support-for-Architecture-all: Packages\nComponents: main\nDescription: {label} {suite}\nAcquire-By-Hash: yes\n{GENERATION_FIELD}: {generation}\nSHA256:\n{release_lines}",
        origin = cfg.origin,
        label = cfg.label,
        arches = ARCHES.join(" "),
    );
    let (inrelease, gpg) = signer.sign_release(&release)?;
    write_atomic(&dir.join("Release"), release.as_bytes())?;
    write_atomic(&dir.join("Release.gpg"), &gpg)?;
    failpoint("before-inrelease");
    // InRelease last: it is what apt fetches first, so it moves only once everything it names is
    // in place.
    write_atomic(&dir.join("InRelease"), &inrelease)?;
    Ok(by_hash)
}

/// The generation a suite's published Release says it was built from.
pub fn published_generation(public: &Path, suite: &str) -> Option<u64> {
    let text = std::fs::read_to_string(public.join("dists").join(suite).join("InRelease")).ok()?;
    text.lines().find_map(|l| l.strip_prefix(GENERATION_FIELD)?.strip_prefix(':')?.trim().parse().ok())
}
