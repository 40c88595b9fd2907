//! Writes a suite's `dists/` tree from its entries: Packages (plain, gz, xz) per architecture with
//! `Architecture: all` packages in every one, content-addressed `by-hash` copies, and the signed
//! Release. Nothing here reads a .deb: stanzas come from the entries.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use crate::compress::{self, ChunkCache};
use crate::control::ARCHES;
use crate::fsutil::{failpoint, sha256_hex, syncfs, write_atomic, write_unsynced};
use crate::signing::Signer;
use crate::store::{Entry, RepoConfig};

pub const GENERATION_FIELD: &str = "X-Debfleet-Generation";

/// The stanzas of one architecture's Packages, sorted by name and version.
pub fn packages_stanzas(entries: &[Entry], arch: &str) -> Vec<compress::Stanza> {
    let mut chosen: Vec<&Entry> = entries.iter().filter(|e| e.arch == arch || e.arch == "all").collect();
    chosen.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.version_cmp(b)).then_with(|| a.arch.cmp(&b.arch)));
    chosen
        .into_iter()
        .map(|e| compress::Stanza {
            boundary: e.boundary_key(),
            text: e.stanza(),
            identity: format!("{} {}", e.sha256, e.filename),
        })
        .collect()
}

/// Writes the indices and the signed Release; returns the by-hash files it references
/// (relative to the suite directory) so older ones can be collected later.
pub fn write_suite(
    public: &Path,
    pdiff_history: &Path,
    suite: &str,
    generation: u64,
    entries: &[Entry],
    deltas: &[crate::deltas::DeltaRecord],
    cfg: &RepoConfig,
    signer: &Signer,
    cache: &mut ChunkCache,
) -> Result<Vec<String>> {
    let dir = public.join("dists").join(suite);
    let mut used = Vec::new();
    let mut files: Vec<(String, std::sync::Arc<[(Vec<u8>, String); 3]>, usize)> = Vec::new();
    // Architectures whose indices come out identical (only `all` packages, say) share one build.
    let mut built: Vec<(String, std::sync::Arc<[(Vec<u8>, String); 3]>)> = Vec::new();
    for arch in ARCHES {
        let chunks = compress::chunks(packages_stanzas(entries, arch));
        let key: String = chunks.iter().map(|c| c.key.as_str()).collect();
        let set = match built.iter().find(|(k, _)| *k == key) {
            Some((_, set)) => set.clone(),
            None => {
                let (gz, xz) = cache.build(&chunks, cfg.xz_preset, &mut used);
                let plain: Vec<u8> = chunks.iter().flat_map(|c| c.text.bytes()).collect();
                let with_hash = |b: Vec<u8>| {
                    let h = sha256_hex(&b);
                    (b, h)
                };
                let set = std::sync::Arc::new([with_hash(gz), with_hash(xz), with_hash(plain)]);
                built.push((key, set.clone()));
                set
            }
        };
        // Index diffs: a device with an older Packages fetches one small patch instead of the
        // whole index. The patches go out before the Release that names their Index.
        let plain = &set[2].0;
        let history = crate::pdiff::History::update(&pdiff_history.join(format!("binary-{arch}")), plain)?;
        let patches = crate::pdiff::make_patches(&history, plain);
        crate::pdiff::write_patches(&dir.join(format!("main/binary-{arch}/Packages.diff")), &patches)?;
        let diff_index = crate::pdiff::render_index(plain, &patches).into_bytes();
        let diff_sha = sha256_hex(&diff_index);
        let diff_set =
            std::sync::Arc::new([(diff_index, diff_sha), (Vec::new(), String::new()), (Vec::new(), String::new())]);
        let base = format!("main/binary-{arch}/Packages");
        files.push((format!("{base}.diff/Index"), diff_set, 0));
        files.push((format!("{base}.gz"), set.clone(), 0));
        files.push((format!("{base}.xz"), set.clone(), 1));
        files.push((base, set, 2));
        // The delta index, for apt to fetch and verify like Packages (an index target the agent
        // package declares). Listed even when empty: apt then drops an old copy.
        let plain = crate::deltas::index(deltas, arch).into_bytes();
        let gz = compress::gzip_member(&plain);
        let (gz_sha, plain_sha) = (sha256_hex(&gz), sha256_hex(&plain));
        let set = std::sync::Arc::new([(gz, gz_sha), (plain, plain_sha.clone()), (Vec::new(), plain_sha)]);
        let base = format!("main/binary-{arch}/Deltas");
        files.push((format!("{base}.gz"), set.clone(), 0));
        files.push((base, set, 1));
    }
    cache.retain(&used);
    let mut release_lines = String::new();
    let mut by_hash = Vec::new();
    // Immutable, content-addressed copies first: a client holding the old Release still finds
    // the old ones, and one that gets the new Release finds the new ones.
    // Each distinct file is written once; the other architectures' by-hash names and the plain
    // names are hard links to it (by-hash files never change, plain names move by rename).
    let mut written: std::collections::HashMap<&str, std::path::PathBuf> = std::collections::HashMap::new();
    let mut plain_names = Vec::new();
    for (rel, set, i) in &files {
        let (bytes, sha) = (&set[*i].0, &set[*i].1);
        let parent = Path::new(rel).parent().expect("has a parent").to_string_lossy().into_owned();
        let hashed = format!("{parent}/by-hash/SHA256/{sha}");
        let path = dir.join(&hashed);
        if !path.exists() {
            let linked = match written.get(sha.as_str()) {
                Some(first) => std::fs::create_dir_all(path.parent().expect("parent"))
                    .and_then(|_| std::fs::hard_link(first, &path))
                    .is_ok(),
                None => false,
            };
            if !linked {
                write_unsynced(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
            }
        }
        written.entry(sha.as_str()).or_insert_with(|| path.clone());
        by_hash.push(hashed);
        plain_names.push((dir.join(rel), path, bytes));
        let _ = writeln!(release_lines, " {sha} {} {rel}", bytes.len());
    }
    failpoint("after-by-hash");
    for (plain, hashed, bytes) in plain_names {
        if link_into_place(&hashed, &plain).is_err() {
            write_unsynced(&plain, bytes)?;
        }
    }
    let (date, valid_until) = dates(cfg.valid_for());
    let release = format!(
        "Origin: {origin}\nLabel: {label}\nSuite: {suite}\nCodename: {suite}\nDate: {date}\nValid-Until: {valid_until}\nArchitectures: {arches}\nNo-Support-for-Architecture-all: Packages\nComponents: main\nDescription: {label} {suite}\nAcquire-By-Hash: yes\n{GENERATION_FIELD}: {generation}\nSHA256:\n{release_lines}",
        origin = cfg.origin,
        label = cfg.label,
        arches = ARCHES.join(" "),
    );
    sign_and_switch(&dir, generation, &release, signer)?;
    Ok(by_hash)
}

fn sign_and_switch(dir: &Path, generation: u64, release: &str, signer: &Signer) -> Result<()> {
    let (inrelease, gpg) = signer.sign_release(release)?;
    switch_release_pair(dir, generation, release.as_bytes(), &gpg)?;
    // One flush for everything above (cheaper than a sync per file), so that all the new
    // Release names is on disk before the InRelease that apt reads first points at it.
    syncfs(dir)?;
    failpoint("before-inrelease");
    write_atomic(&dir.join("InRelease"), &inrelease)?;
    Ok(())
}

/// `Date` (now) and `Valid-Until` (now + `valid_for`) as Release writes them.
fn dates(valid_for: Duration) -> (String, String) {
    let now = SystemTime::now();
    let fmt = |t: SystemTime| httpdate::fmt_http_date(t).replace("GMT", "UTC");
    (fmt(now), fmt(now + valid_for))
}

/// When a suite's published Release stops being valid (`None` without one, or unreadable).
pub fn valid_until(public: &Path, suite: &str) -> Option<SystemTime> {
    let text = std::fs::read_to_string(public.join("dists").join(suite).join("Release")).ok()?;
    let value = text.lines().find_map(|l| l.strip_prefix("Valid-Until:"))?.trim();
    httpdate::parse_http_date(&value.replace("UTC", "GMT")).ok()
}

/// Signs a suite's Release again with a fresh `Date` and `Valid-Until`, its indices and
/// generation unchanged: what keeps a repository that nobody publishes to valid, so that apt's
/// expiry check can tell a current repository from a replayed old one.
pub fn resign(public: &Path, suite: &str, valid_for: Duration, signer: &Signer) -> Result<()> {
    let dir = public.join("dists").join(suite);
    let old = std::fs::read_to_string(dir.join("Release")).with_context(|| format!("reading {suite}'s Release"))?;
    let generation = old
        .lines()
        .find_map(|l| l.strip_prefix(GENERATION_FIELD)?.strip_prefix(':')?.trim().parse::<u64>().ok())
        .with_context(|| format!("{suite}'s Release has no {GENERATION_FIELD}"))?;
    let (date, valid_until) = dates(valid_for);
    let mut release = String::with_capacity(old.len() + 40);
    let mut had_valid_until = false;
    for line in old.lines() {
        if line.starts_with("Date:") {
            let _ = writeln!(release, "Date: {date}");
            // A Release written before Valid-Until existed gets it after Date.
            if !old.contains("\nValid-Until:") {
                let _ = writeln!(release, "Valid-Until: {valid_until}");
                had_valid_until = true;
            }
        } else if line.starts_with("Valid-Until:") {
            let _ = writeln!(release, "Valid-Until: {valid_until}");
            had_valid_until = true;
        } else {
            release.push_str(line);
            release.push('\n');
        }
    }
    anyhow::ensure!(had_valid_until, "{suite}'s Release has no Date field");
    sign_and_switch(&dir, generation, &release, signer)
}

/// Where the detached-signature pair lives: `.release/GEN/{Release,Release.gpg}`, with
/// `.release/current` a symlink to the generation in force, and `Release` and `Release.gpg`
/// symlinks through it. One rename of `current` switches both names at once, so a reader never
/// finds a Release beside the signature of another (as it could between two renames).
const PAIR_DIR: &str = ".release";
/// Older pairs kept for readers that resolved `current` a moment ago.
const PAIRS_KEPT: u64 = 3;

fn switch_release_pair(dir: &Path, generation: u64, release: &[u8], gpg: &[u8]) -> Result<()> {
    use std::os::unix::fs::symlink;
    let pairs = dir.join(PAIR_DIR);
    // A fresh directory for every write, even of the same generation (a repair after a crash
    // rebuilds it): the pair `current` points at is never rewritten in place.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let name = format!("{generation}.{nanos}.{}", std::process::id());
    let this = pairs.join(&name);
    std::fs::create_dir_all(&this)?;
    write_unsynced(&this.join("Release"), release)?;
    failpoint("between-release-files");
    write_unsynced(&this.join("Release.gpg"), gpg)?;
    let tmp = pairs.join(format!(".current.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    symlink(&name, &tmp)?;
    std::fs::rename(&tmp, pairs.join("current"))?;
    // The public names point through `current` once and for all (a repository made before this
    // layout has plain files there: replaced, atomically, by the links).
    for name in ["Release", "Release.gpg"] {
        let public = dir.join(name);
        let target = Path::new(PAIR_DIR).join("current").join(name);
        if std::fs::read_link(&public).ok().as_deref() != Some(target.as_path()) {
            let tmp = dir.join(format!(".{name}.{}.link", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            symlink(&target, &tmp)?;
            std::fs::rename(&tmp, &public)?;
        }
    }
    for old in std::fs::read_dir(&pairs)?.flatten() {
        let file_name = old.file_name();
        let Some(n) = file_name.to_str() else { continue };
        let gen = n.split('.').next().and_then(|g| g.parse::<u64>().ok());
        // Older generations go; of this one, the pairs replaced by a repair go too.
        let stale = gen.is_some_and(|g| g + PAIRS_KEPT <= generation || (g == generation && n != name));
        if stale && old.path().is_dir() {
            let _ = std::fs::remove_dir_all(old.path());
        }
    }
    Ok(())
}

/// Puts `target` in place as another name of `source`, atomically replacing what was there.
fn link_into_place(source: &Path, target: &Path) -> std::io::Result<()> {
    let tmp = target.with_file_name(format!(".link.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::fs::hard_link(source, &tmp)?;
    std::fs::rename(&tmp, target)
}

/// The generation a suite's published Release says it was built from.
pub fn published_generation(public: &Path, suite: &str) -> Option<u64> {
    let text = std::fs::read_to_string(public.join("dists").join(suite).join("InRelease")).ok()?;
    text.lines().find_map(|l| l.strip_prefix(GENERATION_FIELD)?.strip_prefix(':')?.trim().parse().ok())
}
