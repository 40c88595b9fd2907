//! The repository on disk and every change to it. One writer at a time (a mutex in the process
//! and `flock` across processes); readers are plain file reads of what renames put in place.
//!
//! Layout under the root:
//! - `repo.json` (settings), `keys/signing.asc`, `tokens.json`, `db/SUITE.json` (the truth:
//!   each suite's entries), `tmp/` (uploads in progress), `lock`;
//! - `public/` (what is served): `dists/`, `pool/`, `debfleet-archive-keyring.gpg` (and `.asc`).
//!
//! A change goes: .deb into the pool → suite database (atomic, durable: the commit point) →
//! indices and signed Release. On start the server finishes what a crash interrupted: suites
//! whose published generation differs from the database are re-indexed, unreferenced pool files
//! and stale uploads are removed.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::control::{valid_package_name, valid_suite, valid_version, Paragraph};
use crate::deb::{read_control, DebError};
use crate::deltas::{self, DeltaRecord};
use crate::fsutil::{failpoint, sync_dir, write_atomic};
use crate::indices;
use crate::signing::Signer;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepoConfig {
    pub origin: String,
    pub label: String,
    /// Versions kept per package (and architecture) in each suite.
    pub retention: usize,
    pub max_upload_bytes: u64,
    pub xz_preset: u32,
    /// Repositories made before deltas existed read the defaults.
    #[serde(default)]
    pub deltas: crate::deltas::DeltaConfig,
    /// How long a signed Release is valid (its `Valid-Until`); a serving repository signs it
    /// again when half of that is left. Repositories made before it read a week.
    #[serde(default = "default_valid_for")]
    pub valid_for_secs: u64,
}

pub const DEFAULT_VALID_FOR_SECS: u64 = 7 * 24 * 3600;

fn default_valid_for() -> u64 {
    DEFAULT_VALID_FOR_SECS
}

impl RepoConfig {
    pub fn valid_for(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.valid_for_secs)
    }
}

impl Default for RepoConfig {
    fn default() -> Self {
        RepoConfig {
            origin: "debfleet".into(),
            label: "debfleet".into(),
            retention: 5,
            max_upload_bytes: 512 << 20,
            xz_preset: 6,
            deltas: Default::default(),
            valid_for_secs: DEFAULT_VALID_FOR_SECS,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub version: String,
    pub arch: String,
    /// Path relative to `public/`, as in the Packages `Filename` field.
    pub filename: String,
    pub size: u64,
    pub sha256: String,
    pub control: Paragraph,
    /// The rendered Packages stanza, made once per entry.
    #[serde(skip)]
    rendered: std::sync::OnceLock<std::sync::Arc<str>>,
}

impl Entry {
    pub fn new(control: Paragraph, filename: String, size: u64, sha256: String) -> Entry {
        let field = |f: &str| control.get(f).expect("validated control paragraph").to_owned();
        let (name, version, arch) = (field("Package"), field("Version"), field("Architecture"));
        Entry { name, version, arch, filename, size, sha256, control, rendered: Default::default() }
    }

    pub fn stanza(&self) -> std::sync::Arc<str> {
        self.rendered
            .get_or_init(|| {
                format!("{}Filename: {}\nSize: {}\nSHA256: {}\n\n", self.control, self.filename, self.size, self.sha256)
                    .into()
            })
            .clone()
    }

    pub fn boundary_key(&self) -> u64 {
        crate::compress::boundary_hash(&[&self.name, &self.version, &self.arch])
    }

    pub fn version_cmp(&self, other: &Entry) -> std::cmp::Ordering {
        match (self.version.parse::<debversion::Version>(), other.version.parse::<debversion::Version>()) {
            (Ok(a), Ok(b)) => a.cmp(&b),
            _ => self.version.cmp(&other.version),
        }
    }
}

#[derive(Default, Serialize, Deserialize)]
struct SuiteDb {
    generation: u64,
    entries: Vec<Entry>,
    /// Deltas between versions of the same package, built and skipped.
    #[serde(default)]
    deltas: Vec<DeltaRecord>,
    /// What recent generations still name; kept in its own small file (`db/SUITE.by-hash`),
    /// written after each index build.
    #[serde(skip)]
    history: History,
    #[serde(skip)]
    chunks: crate::compress::ChunkCache,
    /// The database file this copy was read from or written to, held open: another process's
    /// commit renames a new file into place, and while we hold the old one its inode cannot be
    /// reused for the new, so comparing (device, inode) is exact.
    #[serde(skip)]
    file: Option<(fs::File, (u64, u64))>,
}

/// The generations whose indices may still be in a client's hands, and the pool files that
/// left the suite but that those indices still name.
#[derive(Default, Serialize, Deserialize)]
struct History {
    /// Newest last.
    generations: Vec<Generation>,
    /// Pool files dropped from the suite (retention, removal), kept until every generation
    /// that named them has aged out.
    #[serde(default)]
    retired: Vec<Retired>,
}

#[derive(Serialize, Deserialize)]
struct Generation {
    generation: u64,
    /// Unix time of publication.
    at: u64,
    /// by-hash files it references, relative to the suite directory.
    by_hash: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone)]
struct Retired {
    filename: String,
    /// The first generation that no longer names it.
    from_generation: u64,
}

impl History {
    fn read(path: &Path) -> History {
        // A missing or unreadable history only means older by-hash files go sooner; a retired
        // pool file it forgot is collected as unreferenced on the next start.
        fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    fn oldest_kept(&self) -> Option<u64> {
        self.generations.first().map(|g| g.generation)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    /// The token's scope does not reach this package or suite.
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Deb(#[from] DebError),
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

impl From<std::io::Error> for RepoError {
    fn from(e: std::io::Error) -> Self {
        RepoError::Internal(e.into())
    }
}

/// What an import did: the versions now in the suite, and those retention dropped at once
/// (older than what it keeps).
#[derive(Debug, Clone, Serialize)]
pub struct Imported {
    pub added: Vec<String>,
    pub pruned: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Published {
    pub suite: String,
    pub name: String,
    pub version: String,
    pub arch: String,
    pub sha256: String,
    pub size: u64,
    pub filename: String,
    /// `published`, or `unchanged` when the identical file was already there.
    pub status: &'static str,
    /// Versions dropped by the retention rule.
    pub pruned: Vec<String>,
}

pub struct Repo {
    root: PathBuf,
    pub config: RepoConfig,
    signer: Signer,
    suites: Mutex<BTreeMap<String, SuiteDb>>,
    /// Wakes the delta builder of a serving process after a change.
    delta_wake: Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

/// Holds the cross-process lock while alive.
struct FileLock(fs::File);

impl FileLock {
    fn acquire(path: &Path) -> std::io::Result<FileLock> {
        use std::os::fd::AsRawFd;
        let f = fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(FileLock(f))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// By-hash files stay while any generation published in this window references them...
const BY_HASH_KEEP_SECS: u64 = 15 * 60;
/// ...and those of this many latest generations stay regardless of age.
const BY_HASH_MIN_GENERATIONS: usize = 3;

pub fn pool_path(name: &str, version: &str, arch: &str) -> String {
    let prefix = if name.starts_with("lib") && name.len() > 3 { &name[..4] } else { &name[..1] };
    let file_version = version.split_once(':').map(|(_, v)| v).unwrap_or(version);
    format!("pool/main/{prefix}/{name}/{name}_{file_version}_{arch}.deb")
}

impl Repo {
    pub fn public(&self) -> PathBuf {
        self.root.join("public")
    }

    /// Where this process puts uploads in progress.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp").join(std::process::id().to_string())
    }

    pub fn tokens_path(root: &Path) -> PathBuf {
        root.join("tokens.json")
    }

    /// Creates a new repository (refuses a non-empty existing one).
    pub fn init(root: &Path, signer: &Signer, config: RepoConfig) -> anyhow::Result<()> {
        if root.join("repo.json").exists() {
            anyhow::bail!("{} already holds a repository", root.display());
        }
        for d in ["db", "tmp", "keys", "public/dists", "public/pool"] {
            fs::create_dir_all(root.join(d))?;
        }
        let key_path = root.join("keys/signing.asc");
        crate::fsutil::write_private(&key_path, signer.secret_armored()?.as_bytes())?;
        write_atomic(&root.join("public/debfleet-archive-keyring.gpg"), &signer.public_binary()?)?;
        write_atomic(&root.join("public/debfleet-archive-keyring.asc"), signer.public_armored()?.as_bytes())?;
        write_atomic(&root.join("repo.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
        Ok(())
    }

    /// Opens a repository and repairs what an interrupted change left behind. Several
    /// processes may have the same repository open (`serve` and `import`): every change
    /// re-reads, under the lock, what another one committed.
    pub fn open(root: &Path) -> anyhow::Result<Repo> {
        use anyhow::Context;
        let cfg_path = root.join("repo.json");
        let config: RepoConfig = serde_json::from_slice(
            &fs::read(&cfg_path).with_context(|| format!("{} is not a repository (run init)", root.display()))?,
        )
        .with_context(|| format!("parsing {}", cfg_path.display()))?;
        let signer = Signer::load(&root.join("keys/signing.asc"))?;
        let repo = Repo {
            root: root.to_owned(),
            config,
            signer,
            suites: Mutex::new(BTreeMap::new()),
            delta_wake: Mutex::new(None),
        };
        {
            let _lock = FileLock::acquire(&root.join("lock"))?;
            let mut suites = repo.suites.lock().unwrap_or_else(|p| p.into_inner());
            repo.refresh(&mut suites)?;
            repo.clean_tmp()?;
            let names: Vec<String> = suites.keys().cloned().collect();
            for name in names {
                let db = suites.get_mut(&name).expect("listed");
                if indices::published_generation(&repo.public(), &name) != Some(db.generation) {
                    tracing::warn!("suite {name}: indices do not match the database (interrupted change); rebuilding");
                    repo.reindex(&name, db)?;
                }
            }
            repo.collect_pool(&suites)?;
        }
        Ok(repo)
    }

    /// Brings the in-memory databases up to what is on disk: suites another process committed
    /// (or created) since this one last looked are read again. Cheap when nothing changed (one
    /// `stat` per suite).
    fn refresh(&self, suites: &mut BTreeMap<String, SuiteDb>) -> anyhow::Result<()> {
        use anyhow::Context;
        use std::os::unix::fs::MetadataExt;
        for item in fs::read_dir(self.root.join("db"))? {
            let path = item?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if !valid_suite(name) {
                continue;
            }
            let meta = fs::metadata(&path)?;
            let id = (meta.dev(), meta.ino());
            if suites.get(name).and_then(|db| db.file.as_ref()).is_some_and(|(_, held)| *held == id) {
                continue;
            }
            if suites.contains_key(name) {
                tracing::info!("suite {name}: another process changed it; reading it again");
            }
            let mut f = fs::File::open(&path)?;
            let held = {
                let m = f.metadata()?;
                (m.dev(), m.ino())
            };
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut bytes)?;
            let mut db: SuiteDb =
                serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
            db.history = History::read(&self.history_path(name));
            db.file = Some((f, held));
            suites.insert(name.to_owned(), db);
        }
        Ok(())
    }

    fn history_path(&self, suite: &str) -> PathBuf {
        self.root.join("db").join(format!("{suite}.by-hash"))
    }

    /// Takes both locks and brings the databases up to date: every change starts here.
    fn begin(&self) -> Result<(std::sync::MutexGuard<'_, BTreeMap<String, SuiteDb>>, FileLock), RepoError> {
        let mut suites = self.suites.lock().unwrap_or_else(|p| p.into_inner());
        let lock = FileLock::acquire(&self.root.join("lock"))?;
        self.refresh(&mut suites)?;
        // The history is written after the database; a lock-free read may have caught the new
        // database with the old history. Under the lock both are whole: read the history again.
        for (name, db) in suites.iter_mut() {
            db.history = History::read(&self.history_path(name));
        }
        Ok((suites, lock))
    }

    /// Removes uploads left by processes that are gone; a live process's uploads in progress
    /// (each process has its own `tmp/PID/`) are not touched.
    fn clean_tmp(&self) -> std::io::Result<()> {
        let tmp = self.root.join("tmp");
        fs::create_dir_all(&tmp)?;
        for item in fs::read_dir(&tmp)?.flatten() {
            let alive = item
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
                // SAFETY: kill(2) with signal 0 only checks that the process exists.
                .is_some_and(|pid| pid == std::process::id() as i32 || unsafe { libc::kill(pid, 0) } == 0);
            if !alive {
                let path = item.path();
                let _ = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
            }
        }
        fs::create_dir_all(self.tmp_dir())
    }

    fn save_db(&self, suite: &str, db: &mut SuiteDb) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let path = self.root.join("db").join(format!("{suite}.json"));
        write_atomic(&path, &serde_json::to_vec(db)?)?;
        let f = fs::File::open(&path)?;
        let m = f.metadata()?;
        db.file = Some(((f), (m.dev(), m.ino())));
        Ok(())
    }

    fn reindex(&self, suite: &str, db: &mut SuiteDb) -> anyhow::Result<()> {
        let files = indices::write_suite(
            &self.public(),
            &self.root.join("pdiff").join(suite),
            suite,
            db.generation,
            &db.entries,
            &db.deltas,
            &self.config,
            &self.signer,
            &mut db.chunks,
        )?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        db.history.generations.retain(|g| g.generation < db.generation);
        db.history.generations.push(Generation { generation: db.generation, at: now, by_hash: files });
        // A client that fetched an InRelease a while ago (a slow link, a busy publisher) must
        // still find every by-hash file it names: keep what recent generations referenced.
        while db.history.generations.len() > BY_HASH_MIN_GENERATIONS
            && now.saturating_sub(db.history.generations[0].at) > BY_HASH_KEEP_SECS
        {
            db.history.generations.remove(0);
        }
        crate::fsutil::write_unsynced(&self.history_path(suite), &serde_json::to_vec(&db.history)?)?;
        let keep: HashSet<&String> = db.history.generations.iter().flat_map(|g| &g.by_hash).collect();
        let dir = self.public().join("dists").join(suite).join("main");
        for arch_dir in fs::read_dir(&dir)?.flatten() {
            // The indices' by-hash copies, and the index diffs' (Packages.diff/Index).
            for sub in ["", "Packages.diff/"] {
                let hashes = arch_dir.path().join(format!("{sub}by-hash/SHA256"));
                let Ok(list) = fs::read_dir(&hashes) else { continue };
                for f in list.flatten() {
                    let rel = format!(
                        "main/{}/{sub}by-hash/SHA256/{}",
                        arch_dir.file_name().to_string_lossy(),
                        f.file_name().to_string_lossy()
                    );
                    if !keep.contains(&rel) {
                        let _ = fs::remove_file(f.path());
                    }
                }
            }
        }
        Ok(())
    }

    /// Pool files the suite's last commit dropped: kept while an index of a kept generation
    /// still names them (a device with slightly old lists downloads them, a rollback target
    /// just pushed out by retention among them), deleted after.
    fn retire(&self, suites: &mut BTreeMap<String, SuiteDb>, suite: &str, dropped: &[Entry], deltas: Vec<String>) {
        if let Some(db) = suites.get_mut(suite) {
            for f in dropped.iter().map(|e| e.filename.clone()).chain(deltas) {
                if !db.history.retired.iter().any(|r| r.filename == f) {
                    db.history.retired.push(Retired { filename: f, from_generation: db.generation });
                }
            }
        }
        self.collect_retired(suites);
        // Recorded after the collection, for every suite, so no history names a deleted file.
        for (name, db) in suites.iter() {
            if let Err(e) = crate::fsutil::write_unsynced(
                &self.history_path(name),
                &serde_json::to_vec(&db.history).unwrap_or_default(),
            ) {
                tracing::warn!("suite {name}: cannot record retired pool files: {e}");
            }
        }
    }

    /// Deletes retired pool files no kept generation names and no suite has (again).
    fn collect_retired(&self, suites: &mut BTreeMap<String, SuiteDb>) {
        let mut due = Vec::new();
        for db in suites.values_mut() {
            let oldest = db.history.oldest_kept().unwrap_or(db.generation);
            let (gone, kept): (Vec<Retired>, Vec<Retired>) =
                db.history.retired.drain(..).partition(|r| r.from_generation <= oldest);
            db.history.retired = kept;
            due.extend(gone.into_iter().map(|r| r.filename));
        }
        for f in due {
            let referenced = suites.values().any(|db| {
                db.entries.iter().any(|e| e.filename == f)
                    || db.deltas.iter().any(|d| d.filename() == Some(f.as_str()))
                    || db.history.retired.iter().any(|r| r.filename == f)
            });
            if !referenced {
                tracing::info!("removing {f} (no suite or kept index names it)");
                let _ = fs::remove_file(self.public().join(&f));
            }
        }
    }

    /// Removes pool files no suite references (left by a crash, retention or removal).
    fn collect_pool(&self, suites: &BTreeMap<String, SuiteDb>) -> std::io::Result<()> {
        let referenced: HashSet<&str> = suites
            .values()
            .flat_map(|db| {
                db.entries
                    .iter()
                    .map(|e| e.filename.as_str())
                    .chain(db.deltas.iter().filter_map(|d| d.filename()))
                    .chain(db.history.retired.iter().map(|r| r.filename.as_str()))
            })
            .collect();
        let pool = self.public().join("pool");
        let mut stack = vec![pool];
        while let Some(dir) = stack.pop() {
            let Ok(list) = fs::read_dir(&dir) else { continue };
            for item in list.flatten() {
                let path = item.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Ok(rel) = path.strip_prefix(self.public()) {
                    if !referenced.contains(rel.to_string_lossy().as_ref()) {
                        tracing::info!("removing unreferenced {}", rel.display());
                        let _ = fs::remove_file(&path);
                    }
                }
            }
        }
        Ok(())
    }

    /// Commits a changed suite: database first (durable), then indices. Returns the delta files
    /// whose versions left the suite (to retire).
    fn commit(&self, suites: &mut BTreeMap<String, SuiteDb>, suite: &str) -> Result<Vec<String>, RepoError> {
        let db = suites.get_mut(suite).expect("suite present");
        let gone = deltas::prune(&db.entries, &mut db.deltas);
        let gone: Vec<String> = gone.iter().filter_map(|d| d.filename().map(str::to_owned)).collect();
        db.generation += 1;
        let started = std::time::Instant::now();
        self.save_db(suite, db)?;
        let saved = started.elapsed();
        failpoint("after-db");
        self.reindex(suite, db)?;
        tracing::debug!("commit {suite}: database {saved:?}, indices {:?}", started.elapsed() - saved);
        Ok(gone)
    }

    fn check_suite(suite: &str) -> Result<(), RepoError> {
        if valid_suite(suite) {
            Ok(())
        } else {
            Err(RepoError::BadRequest(format!(
                "suite {suite:?} must match [a-z0-9][a-z0-9.-]* (at most 64 characters)"
            )))
        }
    }

    /// Publishes an uploaded .deb (a file under `tmp/`, already hashed) into a suite, if
    /// `permit` allows its package name (a token's scope: the name is known only from the file).
    pub fn publish(
        &self,
        suite: &str,
        upload: &Path,
        sha256: &str,
        size: u64,
        permit: &dyn Fn(&str) -> Result<(), String>,
    ) -> Result<Published, RepoError> {
        Self::check_suite(suite)?;
        let control = read_control(fs::File::open(upload)?)?;
        let entry = Entry::new(control, String::new(), size, sha256.to_owned());
        permit(&entry.name).map_err(RepoError::Forbidden)?;
        let entry = Entry { filename: pool_path(&entry.name, &entry.version, &entry.arch), ..entry };

        let (mut suites, _lock) = self.begin()?;
        if let Some(same) = find(&suites, suite, &entry.name, &entry.version, &entry.arch) {
            if same.sha256 == entry.sha256 {
                return Ok(published(suite, same, "unchanged", vec![]));
            }
            return Err(conflict(&entry, suite));
        }
        self.check_retained(&suites, suite, &entry)?;
        self.place_in_pool(&suites, &entry, |dest| fs::rename(upload, dest))?;
        failpoint("after-pool");
        let db = suites.entry(suite.to_owned()).or_default();
        db.entries.push(entry.clone());
        let pruned = self.apply_retention(db, &entry.name, &entry.arch);
        let result = self.commit(&mut suites, suite);
        if result.is_err() {
            tracing::error!("publishing {} into {suite} failed half-way; the next start repairs it", entry.filename);
        }
        let gone = result?;
        self.retire(&mut suites, suite, &pruned, gone);
        self.wake_deltas();
        let pruned = pruned.into_iter().map(|e| e.version).collect();
        tracing::info!("published {} {} {} into {suite}", entry.name, entry.version, entry.arch);
        Ok(published(suite, &entry, "published", pruned))
    }

    /// Refuses a version that retention would drop at once (older than every version kept):
    /// answering "published" for a package that is not there would be a lie.
    fn check_retained(&self, suites: &BTreeMap<String, SuiteDb>, suite: &str, entry: &Entry) -> Result<(), RepoError> {
        let kept: Vec<&Entry> = suites
            .get(suite)
            .map(|db| db.entries.iter().filter(|e| e.name == entry.name && e.arch == entry.arch).collect())
            .unwrap_or_default();
        let newer = kept.iter().filter(|k| entry.version_cmp(k).is_lt()).count();
        if newer >= self.config.retention {
            let oldest = kept.iter().min_by(|a, b| a.version_cmp(b)).map(|e| e.version.as_str()).unwrap_or("");
            return Err(RepoError::Conflict(format!(
                "{} {} is older than all {} versions {suite} keeps (the oldest is {oldest}): retention would drop it at once; \
                 remove a newer version first or raise the retention",
                entry.name,
                entry.version,
                newer
            )));
        }
        Ok(())
    }

    /// Puts an upload at its pool path with `put`. A file already there that a suite (or a
    /// kept index) names must be the same bytes; one nothing names is an orphan of an
    /// interrupted change and is replaced, never reused for different content.
    fn place_in_pool(
        &self,
        suites: &BTreeMap<String, SuiteDb>,
        entry: &Entry,
        put: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<(), RepoError> {
        let pool_file = self.public().join(&entry.filename);
        let named = suites.values().find_map(|db| {
            db.entries.iter().find(|e| e.filename == entry.filename).map(|e| e.sha256.clone()).or_else(|| {
                // A retired file that is gone (collected) names nothing.
                db.history
                    .retired
                    .iter()
                    .any(|r| r.filename == entry.filename)
                    .then(|| crate::fsutil::file_sha256(&pool_file).ok())
                    .flatten()
            })
        });
        match named {
            Some(sha) if sha == entry.sha256 => return Ok(()),
            Some(_) => return Err(conflict(entry, "another suite")),
            None => {}
        }
        let dir = pool_file.parent().expect("pool path has a parent");
        fs::create_dir_all(dir)?;
        if pool_file.exists() {
            tracing::warn!("{}: replacing an orphan left by an interrupted change", entry.filename);
        }
        put(&pool_file)?;
        sync_dir(dir)?;
        Ok(())
    }

    /// Adds many .deb files to a suite in one commit (one index rebuild), for migrating an
    /// existing repository. Files already present identically are skipped; a conflict stops the
    /// import before anything is committed.
    pub fn import(&self, suite: &str, files: &[PathBuf]) -> Result<Imported, RepoError> {
        use sha2::Digest;
        Self::check_suite(suite)?;
        let (mut suites, _lock) = self.begin()?;
        let mut added: Vec<Entry> = Vec::new();
        for path in files {
            let bytes = fs::read(path)?;
            let control = read_control(std::io::Cursor::new(&bytes)).map_err(|e| match e {
                DebError::Io(io) => RepoError::Internal(io.into()),
                other => RepoError::BadRequest(format!("{}: {other}", path.display())),
            })?;
            let sha256 = crate::fsutil::hex(&sha2::Sha256::digest(&bytes));
            let entry = Entry::new(control, String::new(), bytes.len() as u64, sha256);
            let entry = Entry { filename: pool_path(&entry.name, &entry.version, &entry.arch), ..entry };
            if let Some(same) = find(&suites, suite, &entry.name, &entry.version, &entry.arch)
                .or_else(|| added.iter().find(|e| e.filename == entry.filename))
            {
                if same.sha256 == entry.sha256 {
                    continue;
                }
                return Err(conflict(&entry, suite));
            }
            self.place_in_pool(&suites, &entry, |dest| write_atomic(dest, &bytes))?;
            added.push(entry);
        }
        let mut outcome =
            Imported { added: added.iter().map(|e| format!("{}={}", e.name, e.version)).collect(), pruned: vec![] };
        if !added.is_empty() {
            let db = suites.entry(suite.to_owned()).or_default();
            let keys: BTreeSet<(String, String)> = added.iter().map(|e| (e.name.clone(), e.arch.clone())).collect();
            db.entries.extend(added);
            let mut dropped = Vec::new();
            for (name, arch) in keys {
                dropped.extend(self.apply_retention(db, &name, &arch));
            }
            let gone = self.commit(&mut suites, suite)?;
            outcome.pruned = dropped.iter().map(|e| format!("{}={}", e.name, e.version)).collect();
            outcome.added.retain(|a| !outcome.pruned.contains(a));
            self.retire(&mut suites, suite, &dropped, gone);
            self.wake_deltas();
        }
        Ok(outcome)
    }

    /// Drops the oldest versions of NAME/ARCH beyond the retention count; returns them.
    fn apply_retention(&self, db: &mut SuiteDb, name: &str, arch: &str) -> Vec<Entry> {
        let mut same: Vec<Entry> = db.entries.iter().filter(|e| e.name == name && e.arch == arch).cloned().collect();
        if same.len() <= self.config.retention {
            return Vec::new();
        }
        same.sort_by(|a, b| b.version_cmp(a));
        let drop = same.split_off(self.config.retention);
        db.entries.retain(|e| !(e.name == name && e.arch == arch && drop.iter().any(|d| d.version == e.version)));
        drop
    }

    /// Removes NAME=VERSION (all its architectures, or one) from a suite.
    pub fn remove(&self, suite: &str, name: &str, version: &str, arch: Option<&str>) -> Result<Vec<Entry>, RepoError> {
        Self::check_suite(suite)?;
        check_name_version(name, version)?;
        let (mut suites, _lock) = self.begin()?;
        let db = suites.get_mut(suite).ok_or_else(|| RepoError::NotFound(format!("no suite {suite}")))?;
        let matches = |e: &Entry| e.name == name && e.version == version && arch.is_none_or(|a| a == e.arch);
        let removed: Vec<Entry> = db.entries.iter().filter(|e| matches(e)).cloned().collect();
        if removed.is_empty() {
            return Err(RepoError::NotFound(format!("{name}={version} is not in {suite}")));
        }
        db.entries.retain(|e| !matches(e));
        let gone = self.commit(&mut suites, suite)?;
        self.retire(&mut suites, suite, &removed, gone);
        Ok(removed)
    }

    /// Copies NAME=VERSION (every architecture) from one suite to another, without re-upload.
    pub fn promote(&self, name: &str, version: &str, from: &str, to: &str) -> Result<Vec<Published>, RepoError> {
        Self::check_suite(from)?;
        Self::check_suite(to)?;
        check_name_version(name, version)?;
        if from == to {
            return Err(RepoError::BadRequest("source and target suite are the same".into()));
        }
        let (mut suites, _lock) = self.begin()?;
        let source: Vec<Entry> = suites
            .get(from)
            .map(|db| db.entries.iter().filter(|e| e.name == name && e.version == version).cloned().collect())
            .unwrap_or_default();
        if source.is_empty() {
            return Err(RepoError::NotFound(format!("{name}={version} is not in {from}")));
        }
        let mut out = Vec::new();
        let mut changed = false;
        let mut dropped = Vec::new();
        for e in &source {
            if let Some(same) = find(&suites, to, &e.name, &e.version, &e.arch) {
                if same.sha256 != e.sha256 {
                    return Err(conflict(e, to));
                }
                out.push(published(to, e, "unchanged", vec![]));
                continue;
            }
            self.check_retained(&suites, to, e)?;
            let db = suites.entry(to.to_owned()).or_default();
            db.entries.push(e.clone());
            let pruned = self.apply_retention(db, &e.name, &e.arch);
            out.push(published(to, e, "published", pruned.iter().map(|p| p.version.clone()).collect()));
            dropped.extend(pruned);
            changed = true;
        }
        if changed {
            let gone = self.commit(&mut suites, to)?;
            self.retire(&mut suites, to, &dropped, gone);
            self.wake_deltas();
        }
        Ok(out)
    }

    /// Signs again every suite whose Release has less than half its validity left (or none);
    /// returns the suites signed. A serving repository calls it often enough that none lapses.
    pub fn refresh_signatures(&self) -> Result<Vec<String>, RepoError> {
        let (suites, _lock) = self.begin()?;
        let now = std::time::SystemTime::now();
        let half = self.config.valid_for() / 2;
        let mut signed = Vec::new();
        for name in suites.keys() {
            let fresh = indices::valid_until(&self.public(), name)
                .and_then(|until| until.duration_since(now).ok())
                .is_some_and(|left| left > half);
            if !fresh {
                indices::resign(&self.public(), name, self.config.valid_for(), &self.signer)?;
                tracing::info!("suite {name}: Release signed again (valid for {}s)", self.config.valid_for_secs);
                signed.push(name.clone());
            }
        }
        Ok(signed)
    }

    /// Lets a serving process's delta builder be woken after each change.
    pub fn set_delta_wake(&self, tx: std::sync::mpsc::Sender<()>) {
        *self.delta_wake.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    fn wake_deltas(&self) {
        if let Some(tx) = self.delta_wake.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send(());
        }
    }

    /// Builds the deltas every suite wants (see `deltas`), one suite at a time and one commit
    /// per suite; returns how many pairs were settled (built or skipped). The diffing runs
    /// without the lock: publishing goes on meanwhile, and what changed under it is re-checked.
    pub fn build_deltas(&self) -> anyhow::Result<usize> {
        if !self.config.deltas.enabled {
            return Ok(0);
        }
        self.settle_interrupted_attempt()?;
        let mut settled = 0;
        loop {
            let jobs: Vec<(String, deltas::Job)> = {
                let suites = self.read_view()?;
                suites
                    .iter()
                    .flat_map(|(s, db)| {
                        deltas::wanted(&db.entries, &db.deltas).into_iter().map(move |j| (s.clone(), j))
                    })
                    .collect()
            };
            let names: BTreeSet<String> = jobs.iter().map(|(s, _)| s.clone()).collect();
            let mut progress = 0;
            for suite in names {
                let mut results = Vec::new();
                for (_, job) in jobs.iter().filter(|(s, _)| *s == suite) {
                    // Named on disk while it is made: a pair that takes the process down (memory)
                    // is recorded as skipped on the next start instead of being tried forever.
                    self.mark_attempt(Some((&suite, job)));
                    let (outcome, bytes) = match deltas::build(&self.public(), job, &self.config.deltas) {
                        Ok(r) => r,
                        // Gone meanwhile (the recording re-checks), or unreadable: no delta.
                        Err(e) => (deltas::Outcome::Skipped { reason: format!("reading the packages: {e}") }, None),
                    };
                    results.push((job.clone(), outcome, bytes));
                }
                progress += self.record_deltas(&suite, results)?;
                self.mark_attempt(None);
            }
            if progress == 0 {
                // Nothing wanted, or everything went stale under us: the next change wakes it.
                return Ok(settled);
            }
            settled += progress;
        }
    }

    fn attempt_path(&self) -> PathBuf {
        // Not in db/: every JSON file there is a suite.
        self.root.join("delta-attempt.json")
    }

    fn mark_attempt(&self, job: Option<(&str, &deltas::Job)>) {
        let path = self.attempt_path();
        let _ = match job {
            Some((suite, j)) => crate::fsutil::write_unsynced(
                &path,
                &serde_json::to_vec(&(suite, &j.name, &j.arch, &j.from.version, &j.to.version)).unwrap_or_default(),
            ),
            None => fs::remove_file(&path),
        };
    }

    /// A pair whose making did not finish last time (the process died): recorded as skipped.
    fn settle_interrupted_attempt(&self) -> Result<(), RepoError> {
        let Ok(bytes) = fs::read(self.attempt_path()) else { return Ok(()) };
        let _ = fs::remove_file(self.attempt_path());
        let Ok((suite, name, arch, from, to)) =
            serde_json::from_slice::<(String, String, String, String, String)>(&bytes)
        else {
            return Ok(());
        };
        tracing::warn!("{suite}: making the delta {name} {from} -> {to} {arch} did not finish last time; skipping it");
        let (mut suites, _lock) = self.begin()?;
        let Some(db) = suites.get_mut(&suite) else { return Ok(()) };
        let present = |v: &str| db.entries.iter().any(|e| e.name == name && e.arch == arch && e.version == v);
        let known = db.deltas.iter().any(|r| r.is(&name, &arch, &from, &to));
        if present(&from) && present(&to) && !known {
            let reason = "making it did not finish (the process stopped; too large?)".to_owned();
            db.deltas.push(DeltaRecord { name, arch, from, to, outcome: deltas::Outcome::Skipped { reason } });
            let gone = self.commit(&mut suites, &suite)?;
            self.retire(&mut suites, &suite, &[], gone);
        }
        Ok(())
    }

    fn record_deltas(
        &self,
        suite: &str,
        results: Vec<(deltas::Job, deltas::Outcome, Option<Vec<u8>>)>,
    ) -> Result<usize, RepoError> {
        let (mut suites, _lock) = self.begin()?;
        let Some(db) = suites.get_mut(suite) else { return Ok(0) };
        let mut recorded = 0;
        for (job, outcome, bytes) in results {
            let current = |e: &Entry| db.entries.iter().any(|x| x.filename == e.filename && x.sha256 == e.sha256);
            let known = db.deltas.iter().any(|r| r.is(&job.name, &job.arch, &job.from.version, &job.to.version));
            if !current(&job.from) || !current(&job.to) || known {
                continue;
            }
            if let (Some(bytes), deltas::Outcome::Built { filename, sha256, .. }) = (&bytes, &outcome) {
                // Another suite may hold the same delta already (the same pool files).
                let path = self.public().join(filename);
                if crate::fsutil::file_sha256(&path).ok().as_ref() != Some(sha256) {
                    fs::create_dir_all(path.parent().expect("pool path has a parent"))?;
                    write_atomic(&path, bytes)?;
                }
            }
            match &outcome {
                deltas::Outcome::Built { size, .. } => tracing::info!(
                    "{suite}: delta {} {} -> {} {} ({size} bytes, the package is {})",
                    job.name,
                    job.from.version,
                    job.to.version,
                    job.arch,
                    job.to.size
                ),
                deltas::Outcome::Skipped { reason } => tracing::info!(
                    "{suite}: no delta {} {} -> {} {}: {reason}",
                    job.name,
                    job.from.version,
                    job.to.version,
                    job.arch
                ),
            }
            db.deltas.push(DeltaRecord {
                name: job.name,
                arch: job.arch,
                from: job.from.version,
                to: job.to.version,
                outcome,
            });
            recorded += 1;
        }
        if recorded > 0 {
            let gone = self.commit(&mut suites, suite)?;
            self.retire(&mut suites, suite, &[], gone);
        }
        Ok(recorded)
    }

    /// Forgets every delta (of one suite, or all) so that `build_deltas` makes them again.
    pub fn forget_deltas(&self, only: Option<&str>) -> Result<(), RepoError> {
        let (mut suites, _lock) = self.begin()?;
        let names: Vec<String> = suites.keys().filter(|s| only.is_none_or(|o| o == s.as_str())).cloned().collect();
        for suite in names {
            let db = suites.get_mut(&suite).expect("listed");
            if db.deltas.is_empty() {
                continue;
            }
            let files: Vec<String> = db.deltas.drain(..).filter_map(|d| d.filename().map(str::to_owned)).collect();
            let gone = self.commit(&mut suites, &suite)?;
            self.retire(&mut suites, &suite, &[], files.into_iter().chain(gone).collect());
        }
        Ok(())
    }

    /// Every suite's delta records.
    pub fn delta_records(&self) -> Result<Vec<(String, DeltaRecord)>, RepoError> {
        let suites = self.read_view()?;
        Ok(suites.iter().flat_map(|(s, db)| db.deltas.iter().map(move |d| (s.clone(), d.clone()))).collect())
    }

    /// Read-only views refresh without the cross-process lock: database files are replaced by
    /// rename, so a read sees one whole version.
    fn read_view(&self) -> Result<std::sync::MutexGuard<'_, BTreeMap<String, SuiteDb>>, RepoError> {
        let mut suites = self.suites.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh(&mut suites)?;
        Ok(suites)
    }

    pub fn suites(&self) -> Vec<String> {
        self.read_view().map(|s| s.keys().cloned().collect()).unwrap_or_default()
    }

    /// Every package of a suite with its versions, newest first.
    pub fn list(&self, suite: &str) -> Result<serde_json::Value, RepoError> {
        Self::check_suite(suite)?;
        let suites = self.read_view()?;
        let db = suites.get(suite).ok_or_else(|| RepoError::NotFound(format!("no suite {suite}")))?;
        let mut by_name: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
        for e in &db.entries {
            by_name.entry(&e.name).or_default().push(e);
        }
        let packages: Vec<serde_json::Value> = by_name
            .into_iter()
            .map(|(name, mut es)| {
                es.sort_by(|a, b| b.version_cmp(a).then_with(|| a.arch.cmp(&b.arch)));
                let versions: Vec<serde_json::Value> = es
                    .iter()
                    .map(|e| serde_json::json!({"version": e.version, "arch": e.arch, "size": e.size, "sha256": e.sha256, "filename": e.filename}))
                    .collect();
                serde_json::json!({"name": name, "versions": versions})
            })
            .collect();
        Ok(serde_json::json!({"suite": suite, "packages": packages}))
    }
}

fn check_name_version(name: &str, version: &str) -> Result<(), RepoError> {
    if !valid_package_name(name) {
        return Err(RepoError::BadRequest(format!("{name:?} is not a Debian package name")));
    }
    if !valid_version(version) {
        return Err(RepoError::BadRequest(format!("{version:?} is not a Debian version")));
    }
    Ok(())
}

fn find<'a>(
    suites: &'a BTreeMap<String, SuiteDb>,
    suite: &str,
    name: &str,
    version: &str,
    arch: &str,
) -> Option<&'a Entry> {
    suites.get(suite)?.entries.iter().find(|e| e.name == name && e.version == version && e.arch == arch)
}

fn conflict(e: &Entry, place: &str) -> RepoError {
    RepoError::Conflict(format!(
        "{} {} {} is already published in {place} with different content; publish a new version instead",
        e.name, e.version, e.arch
    ))
}

fn published(suite: &str, e: &Entry, status: &'static str, pruned: Vec<String>) -> Published {
    Published {
        suite: suite.to_owned(),
        name: e.name.clone(),
        version: e.version.clone(),
        arch: e.arch.clone(),
        sha256: e.sha256.clone(),
        size: e.size,
        filename: e.filename.clone(),
        status,
        pruned,
    }
}
