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
    size: u64,
    sha256: String,
}

fn parse_index(text: &str, repo_root: &str) -> Vec<Listed> {
    text.split("\n\n")
        .filter_map(|stanza| {
            let field = |f: &str| stanza.lines().find_map(|l| l.strip_prefix(f)?.strip_prefix(": ").map(str::to_owned));
            let filename = field("Filename")?;
            // The index is signed, but a path is still checked before it becomes a URL.
            if filename.starts_with('/') || filename.split('/').any(|p| p == ".." || p.is_empty()) {
                return None;
            }
            Some(Listed {
                package: field("Package")?,
                arch: field("Architecture")?,
                from: field("From-Version")?,
                to: field("To-Version")?,
                base_payload: field("Base-Payload")?,
                result_payload: field("Result-Payload")?,
                url: format!("{repo_root}{filename}"),
                size: field("Size")?.parse().ok()?,
                sha256: field("SHA256")?,
            })
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
    /// Bytes fetched here (deltas).
    pub delta_bytes: u64,
}

impl Fetcher {
    /// Prepares the packages `changes` would download: rebuilt from deltas where it can be done.
    /// `upgrades` are (name, installed, target); `installs` (name, target) have no base.
    pub async fn prepare(
        &self,
        apt: &Apt,
        upgrades: &[(String, String, String)],
        installs: &[(String, String)],
    ) -> Plan {
        let mut plan = Plan::default();
        let mut wanted: Vec<(String, String)> = upgrades.iter().map(|(n, _, v)| (n.clone(), v.clone())).collect();
        wanted.extend(installs.iter().cloned());
        if wanted.is_empty() {
            return plan;
        }
        let (apt2, w) = (apt.clone(), wanted.clone());
        let (listed, sizes) =
            tokio::task::spawn_blocking(move || (listed_deltas(&apt2), apt2.sizes(&w))).await.unwrap_or_default();
        let _ = std::fs::create_dir_all(&self.work_dir);
        for (name, version) in &wanted {
            let full = sizes.get(&(name.clone(), version.clone())).copied().unwrap_or(0);
            let cached = self.already_downloaded(name, version, full);
            let mut fetch = PackageFetch {
                package: name.clone(),
                version: version.clone(),
                method: FetchMethod::Full,
                bytes: if cached { 0 } else { full },
                full_bytes: full,
                fallback: None,
            };
            let installed = upgrades.iter().find(|(n, _, _)| n == name).map(|(_, from, _)| from);
            let candidate = installed
                .and_then(|from| listed.iter().find(|l| &l.package == name && &l.from == from && &l.to == version));
            if let (true, false, Some(listed)) = (self.enabled, cached, candidate) {
                match self.by_delta(listed).await {
                    Ok(path) => {
                        fetch.method = FetchMethod::Delta;
                        fetch.bytes = listed.size;
                        plan.delta_bytes += listed.size;
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
            part: self.work_dir.join(format!("{}.debdelta", &listed.sha256[..listed.sha256.len().min(32)])),
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
    /// rebuilt file or apt's archive cache, and nothing older.
    pub fn keep(&self, installed: &[(String, String)], rebuilt: &[LocalDeb]) {
        if !self.enabled {
            return;
        }
        let _ = std::fs::create_dir_all(&self.keep_dir);
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
            let linked = std::fs::hard_link(&from, &to).or_else(|_| std::fs::copy(&from, &to).map(|_| ()));
            if let Err(e) = linked {
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

    /// Clears what an interrupted run left: rebuilt packages (partial downloads are kept, to be
    /// resumed).
    pub fn clean(&self) {
        for f in std::fs::read_dir(&self.work_dir).into_iter().flatten().flatten() {
            if f.path().extension().is_some_and(|e| e == "deb") {
                let _ = std::fs::remove_file(f.path());
            }
        }
    }
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
        let text = "Package: hello\nArchitecture: amd64\nFrom-Version: 1.0\nTo-Version: 2.0\nBase-Payload: aa\n\
                    Result-Payload: bb\nFilename: pool/main/h/hello/hello_1.0_to_2.0_amd64.debdelta\nSize: 12\nSHA256: cc\n\n\
                    Package: evil\nArchitecture: all\nFrom-Version: 1\nTo-Version: 2\nBase-Payload: aa\nResult-Payload: bb\n\
                    Filename: ../../etc/passwd\nSize: 1\nSHA256: dd\n\n";
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
    fn epochs_are_escaped_as_apt_does() {
        assert_eq!(deb_name("x", "1:2.0", "amd64"), "x_1%3a2.0_amd64.deb");
    }
}
