//! Fetching packages by delta (docs/delta.md): before an apt transaction, each package that
//! would be downloaded whole and has a delta from the installed version in the repository's
//! signed `Deltas` index is rebuilt here instead, from the copy of the installed version the
//! agent keeps, and handed to apt as a local file (so dependencies still resolve and the change
//! is one ordinary apt transaction). Anything that does not fit — no copy, a copy that is not
//! the delta's base, a download that fails, a delta or result that does not verify — falls back
//! to the whole package, and the result says why.
//!
//! Trust: apt fetched the `Deltas` index and checked it against the signed Release (an index
//! target the agent's package declares); a delta's bytes are checked against that index, and
//! the rebuilt payload against the index's result hash, before apt sees the file.
//!
//! The keep: `state_dir/debs/NAME_VERSION_ARCH.deb`, one version per managed package (the
//! installed one), linked from apt's archive cache or kept from a rebuild; bounded in bytes.

use std::path::PathBuf;

use debfleet_apt::{Apt, LocalDeb};
use debfleet_protocol::{Fallback, FallbackReason, FetchMethod, PackageFetch};

pub use crate::fetch_request::FetchRequest;

/// The index target's identifier in the apt configuration the agent package ships.
pub const INDEX_TARGET: &str = "debfleet-deltas";
/// apt's downloaded packages.
const APT_ARCHIVES: &str = "/var/cache/apt/archives";
/// apt's lists (the indices `apt-get update` fetched).
const APT_LISTS: &str = "/var/lib/apt/lists";

#[derive(Debug, Clone)]
pub struct Fetcher {
    pub enabled: bool,
    /// The keep of installed versions.
    pub keep_dir: PathBuf,
    /// Downloads in progress and rebuilt packages.
    pub work_dir: PathBuf,
    pub keep_max_bytes: u64,
}

/// One entry of a `Deltas` index, with the repository it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    package: String,
    arch: String,
    from: String,
    to: String,
    base_payload: String,
    result_payload: String,
    url: String,
    /// The repository the index came from (`http://host/path/`).
    repo_root: String,
    size: u64,
    sha256: String,
}

fn parse_index(text: &str, repo_root: &str) -> Vec<Listed> {
    text.split("\n\n")
        .filter_map(|stanza| {
            let field = |f: &str| stanza.lines().find_map(|l| l.strip_prefix(f)?.strip_prefix(": ").map(str::to_owned));
            let filename = field("Filename")?;
            // The index is signed, but what becomes a URL, a path or a command-line word is
            // still checked: a stanza that does not fit is ignored.
            if filename.starts_with('/') || filename.split('/').any(|p| p == ".." || p == "." || p.is_empty()) {
                return None;
            }
            let hash = |h: String| (h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())).then_some(h);
            let spec = |n: &str, v: &str| debfleet_protocol::PackageSpec::parse(&format!("{n}={v}")).is_ok();
            let listed = Listed {
                package: field("Package")?,
                arch: field("Architecture")?,
                from: field("From-Version")?,
                to: field("To-Version")?,
                base_payload: hash(field("Base-Payload")?)?,
                result_payload: hash(field("Result-Payload")?)?,
                url: format!("{repo_root}{filename}"),
                repo_root: repo_root.to_owned(),
                size: field("Size")?.parse().ok()?,
                sha256: hash(field("SHA256")?)?,
            };
            let arch_ok = !listed.arch.is_empty()
                && listed.arch.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            (arch_ok && spec(&listed.package, &listed.from) && spec(&listed.package, &listed.to)).then_some(listed)
        })
        .collect()
}

/// `http://host/path/dists/SUITE/` → `http://host/path/`.
fn repo_root(base_uri: &str) -> Option<String> {
    let trimmed = base_uri.trim_end_matches('/');
    let (root, _suite) = trimmed.rsplit_once('/')?;
    root.strip_suffix("/dists").map(|r| format!("{r}/"))
}

/// apt's file name for a package version (`:` of an epoch as `%3a`).
pub fn deb_name(package: &str, version: &str, arch: &str) -> String {
    format!("{package}_{}_{arch}.deb", version.replace(':', "%3a"))
}

/// What the fetch step decided, for apt and for the result.
#[derive(Debug, Default)]
pub struct Plan {
    pub local: Vec<LocalDeb>,
    pub fetches: Vec<PackageFetch>,
}

impl Plan {
    /// Bytes fetched here (deltas).
    pub fn delta_bytes(&self) -> u64 {
        self.fetches.iter().filter(|f| f.method == FetchMethod::Delta).map(|f| f.bytes).sum()
    }
}

impl Fetcher {
    /// Prepares the packages `changes` would download: rebuilt from deltas where it can be done.
    /// `upgrades` are (name, installed, target); `installs` (name, target) have no base.
    /// Only the packages an operator `named` come by delta: apt marks a package given on its
    /// command line as manually installed, which a dependency must not become.
    pub async fn prepare(
        &self,
        apt: &Apt,
        upgrades: &[(String, String, String)],
        installs: &[(String, String)],
        named: &[String],
    ) -> Plan {
        let mut plan = Plan::default();
        let mut wanted: Vec<(String, String)> = upgrades.iter().map(|(n, _, v)| (n.clone(), v.clone())).collect();
        wanted.extend(installs.iter().cloned());
        wanted.retain(|(n, _)| named.contains(n));
        if wanted.is_empty() {
            return plan;
        }
        let (apt2, w) = (apt.clone(), wanted.clone());
        let (listed, uris) = tokio::task::spawn_blocking(move || (listed_deltas(&apt2), apt2.download_uris(&w)))
            .await
            .unwrap_or_default();
        let _ = std::fs::create_dir_all(&self.work_dir);
        for (name, version) in &wanted {
            let (uri, full) = uris.get(&(name.clone(), version.clone())).cloned().unwrap_or_default();
            let cached = self.already_downloaded(name, version, full);
            let mut fetch = PackageFetch {
                package: name.clone(),
                version: version.clone(),
                method: FetchMethod::Full,
                bytes: if cached { 0 } else { full },
                full_bytes: full,
                fallback: None,
            };
            // A delta counts only from the repository apt would fetch this very package from, and
            // for its architecture: a repository is trusted for what apt takes from it, no more.
            let installed = upgrades.iter().find(|(n, _, _)| n == name).map(|(_, from, _)| from);
            let arch = uri.strip_suffix(".deb").and_then(|u| u.rsplit_once('_')).map(|(_, a)| a).unwrap_or("");
            let candidate = installed.and_then(|from| {
                listed.iter().find(|l| {
                    &l.package == name
                        && &l.from == from
                        && &l.to == version
                        && l.arch == arch
                        && !l.repo_root.is_empty()
                        && uri.starts_with(&l.repo_root)
                })
            });
            if let (true, false, Some(listed)) = (self.enabled, cached, candidate) {
                match self.by_delta(listed).await {
                    Ok(path) => {
                        fetch.method = FetchMethod::Delta;
                        fetch.bytes = listed.size;
                        plan.local.push(LocalDeb { package: name.clone(), path });
                    }
                    Err(fallback) => {
                        tracing::warn!("{name} {version}: fetching it whole: {}", fallback.message);
                        fetch.fallback = Some(fallback);
                    }
                }
            }
            plan.fetches.push(fetch);
        }
        plan
    }

    /// apt will not download what its archive cache already holds (a rollback, say).
    fn already_downloaded(&self, name: &str, version: &str, size: u64) -> bool {
        let prefix = format!("{name}_{}_", version.replace(':', "%3a"));
        std::fs::read_dir(APT_ARCHIVES).into_iter().flatten().flatten().any(|f| {
            f.file_name().to_string_lossy().starts_with(&prefix) && f.metadata().is_ok_and(|m| m.len() == size)
        })
    }

    /// Whether any repository lists deltas (a non-empty `…_Deltas` in apt's lists): without one
    /// there is nothing to plan, and no simulation to pay for.
    pub fn has_deltas(&self) -> bool {
        self.enabled
            && std::fs::read_dir(APT_LISTS).into_iter().flatten().flatten().any(|f| {
                f.file_name().to_string_lossy().ends_with("_Deltas") && f.metadata().is_ok_and(|m| m.len() > 0)
            })
    }

    /// Adds the packages apt downloaded whole that the plan did not list (no delta was listed,
    /// or nothing was planned), from apt's own account of the transaction.
    pub fn account(downloads: &[(String, String, u64)], plan: &mut Plan) {
        for (name, version, size) in downloads {
            if !plan.fetches.iter().any(|f| &f.package == name) {
                plan.fetches.push(PackageFetch {
                    package: name.clone(),
                    version: version.clone(),
                    method: FetchMethod::Full,
                    bytes: *size,
                    full_bytes: *size,
                    fallback: None,
                });
            }
        }
    }

    async fn by_delta(&self, listed: &Listed) -> Result<PathBuf, Fallback> {
        let fail = |reason, message: String| Fallback { reason, message };
        let base = self.keep_dir.join(deb_name(&listed.package, &listed.from, &listed.arch));
        if !base.exists() {
            return Err(fail(FallbackReason::NoBase, format!("no kept copy of {} {}", listed.package, listed.from)));
        }
        let out = self.work_dir.join(deb_name(&listed.package, &listed.to, &listed.arch));
        let request = FetchRequest {
            url: listed.url.clone(),
            size: listed.size,
            sha256: listed.sha256.clone(),
            base_payload: listed.base_payload.clone(),
            result_payload: listed.result_payload.clone(),
            base,
            part: self.work_dir.join(format!("{}.debdelta", listed.sha256.get(..32).unwrap_or("delta"))),
            out: out.clone(),
        };
        // The download and the rebuild run in their own process: their code and their tens of
        // MiB never become part of the agent's resident memory.
        let helper = helper_path();
        let json = serde_json::to_string(&request).unwrap_or_default();
        match tokio::process::Command::new(&helper).arg(json).kill_on_drop(true).output().await {
            Ok(o) if o.status.success() => Ok(out),
            Ok(o) => Err(serde_json::from_slice::<Fallback>(&o.stdout).unwrap_or_else(|_| {
                fail(
                    FallbackReason::DeltaInvalid,
                    format!(
                        "{} ended with {}: {}",
                        helper.display(),
                        o.status,
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                )
            })),
            Err(e) => Err(fail(FallbackReason::DownloadFailed, format!("cannot run {}: {e}", helper.display()))),
        }
    }

    /// After a transaction: the keep holds each changed package's installed version, from the
    /// rebuilt file or apt's archive cache, and nothing older; removed packages leave it.
    pub fn keep(&self, installed: &[(String, String)], removed: &[String], rebuilt: &[LocalDeb]) {
        if !self.enabled {
            return;
        }
        let _ = std::fs::create_dir_all(&self.keep_dir);
        for name in removed {
            let prefix = format!("{name}_");
            for old in std::fs::read_dir(&self.keep_dir).into_iter().flatten().flatten() {
                if old.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(old.path());
                }
            }
        }
        for (name, version) in installed {
            let prefix = format!("{name}_");
            let want = format!("{name}_{}_", version.replace(':', "%3a"));
            let from = rebuilt.iter().find(|l| &l.package == name).map(|l| l.path.clone()).or_else(|| {
                std::fs::read_dir(APT_ARCHIVES)
                    .ok()?
                    .flatten()
                    .find(|f| f.file_name().to_string_lossy().starts_with(&want))
                    .map(|f| f.path())
            });
            // Older versions of this package go (the name's own underscore keeps `foo` from
            // matching `foo-bar`).
            for old in std::fs::read_dir(&self.keep_dir).into_iter().flatten().flatten() {
                let n = old.file_name().to_string_lossy().into_owned();
                if n.starts_with(&prefix) && !n.starts_with(&want) {
                    let _ = std::fs::remove_file(old.path());
                }
            }
            let Some(from) = from else { continue };
            let Some(file) = from.file_name() else { continue };
            let to = self.keep_dir.join(file);
            let size = std::fs::metadata(&from).map(|m| m.len()).unwrap_or(0);
            if self.kept_bytes() + size > self.keep_max_bytes {
                tracing::info!("not keeping {} for deltas: the keep is full", file.to_string_lossy());
                continue;
            }
            if let Err(e) = place(&from, &to) {
                tracing::warn!("keeping {}: {e}", to.display());
            }
        }
        for l in rebuilt {
            let _ = std::fs::remove_file(&l.path);
        }
    }

    fn kept_bytes(&self) -> u64 {
        std::fs::read_dir(&self.keep_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    /// Clears what an interrupted run left: rebuilt packages and their temporary files, and
    /// partial downloads older than a week (newer ones are resumed by the next operation).
    pub fn clean(&self) {
        let week = std::time::Duration::from_secs(7 * 86_400);
        for f in std::fs::read_dir(&self.work_dir).into_iter().flatten().flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let stale = f.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().unwrap_or_default() > week);
            if name.ends_with(".deb") || name.ends_with(".deb.tmp") || (name.ends_with(".debdelta") && stale) {
                let _ = std::fs::remove_file(f.path());
            }
        }
    }
}

/// Puts `from` at `to` under another name (a hard link, else a copy), through a temporary name
/// and a rename: never writing into the file `to` names, which may be `from` itself.
fn place(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(a), Ok(b)) = (std::fs::metadata(from), std::fs::metadata(to)) {
        if (a.dev(), a.ino()) == (b.dev(), b.ino()) {
            return Ok(());
        }
    }
    let tmp = to.with_extension("deb.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::fs::hard_link(from, &tmp).or_else(|_| std::fs::copy(from, &tmp).map(|_| ()))?;
    std::fs::rename(&tmp, to)
}

/// The helper that downloads and applies a delta: beside the agent (a build tree), or where the
/// package installs it.
fn helper_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    let beside = dir.join("debfleet-fetch");
    if beside.exists() {
        return beside;
    }
    dir.join("../lib/debfleet/debfleet-fetch")
}

/// Every delta the device's apt lists name.
fn listed_deltas(apt: &Apt) -> Vec<Listed> {
    apt.index_target_files(INDEX_TARGET)
        .into_iter()
        .filter_map(|(file, base)| Some(parse_index(&std::fs::read_to_string(file).ok()?, &repo_root(&base)?)))
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_is_read_and_hostile_paths_are_dropped() {
        let (h1, h2, h3) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
        let text = format!(
            "Package: hello\nArchitecture: amd64\nFrom-Version: 1.0\nTo-Version: 2.0\nBase-Payload: {h1}\n\
             Result-Payload: {h2}\nFilename: pool/main/h/hello/hello_1.0_to_2.0_amd64.debdelta\nSize: 12\nSHA256: {h3}\n\n\
             Package: evil\nArchitecture: all\nFrom-Version: 1\nTo-Version: 2\nBase-Payload: {h1}\nResult-Payload: {h2}\n\
             Filename: ../../etc/passwd\nSize: 1\nSHA256: {h3}\n\n"
        );
        let text = text.as_str();
        let root = repo_root("http://127.0.0.1:8080/dists/stable/").unwrap();
        assert_eq!(root, "http://127.0.0.1:8080/");
        let listed = parse_index(text, &root);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].url, "http://127.0.0.1:8080/pool/main/h/hello/hello_1.0_to_2.0_amd64.debdelta");
        assert_eq!((listed[0].from.as_str(), listed[0].to.as_str(), listed[0].size), ("1.0", "2.0", 12));
        assert_eq!(repo_root("http://h/debian/dists/bookworm/").as_deref(), Some("http://h/debian/"));
        assert_eq!(repo_root("http://h/flat/"), None);
    }

    #[test]
    fn stanzas_that_do_not_fit_are_ignored() {
        let good = |sha: &str, version: &str| {
            format!(
                "Package: hello\nArchitecture: amd64\nFrom-Version: 1.0\nTo-Version: {version}\nBase-Payload: {a}\n\
                 Result-Payload: {a}\nFilename: pool/x.debdelta\nSize: 1\nSHA256: {sha}\n\n",
                a = "a".repeat(64)
            )
        };
        assert_eq!(parse_index(&good(&"b".repeat(64), "2.0"), "http://h/").len(), 1);
        for (sha, version) in
            [("../../etc/x", "2.0"), ("é".repeat(32).as_str(), "2.0"), (&"b".repeat(64)[..], "2 0;rm")]
        {
            assert!(parse_index(&good(sha, version), "http://h/").is_empty(), "{sha} {version}");
        }
    }

    #[test]
    fn keeping_a_file_never_truncates_it_through_another_name() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.deb"), dir.path().join("b.deb"));
        std::fs::write(&a, b"package bytes").unwrap();
        place(&a, &b).unwrap();
        // Again, now that both names are one file (as after a reinstall from apt's cache).
        place(&a, &b).unwrap();
        place(&b, &a).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"package bytes");
        assert_eq!(std::fs::read(&b).unwrap(), b"package bytes");
    }

    #[test]
    fn epochs_are_escaped_as_apt_does() {
        assert_eq!(deb_name("x", "1:2.0", "amd64"), "x_1%3a2.0_amd64.deb");
    }
}
