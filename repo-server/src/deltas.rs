//! Deltas between versions of a package in a suite (format: `docs/delta.md`), built in the
//! background after a publish, one at a time, and listed per architecture in a `Deltas` index
//! that the signed Release covers — so a device trusts a delta exactly as much as a package.
//!
//! What is wanted: for each package and architecture, a delta from every older kept version to
//! the newest. A pair is tried once: built, or recorded as skipped with why (too large, or saving
//! too little). Records whose versions leave the suite go with them (retention, removal).

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::store::Entry;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DeltaConfig {
    pub enabled: bool,
    /// Packages larger than this get no delta (making one holds both in memory, several times).
    pub max_deb_bytes: u64,
    /// A delta is kept only when it saves at least this share of the new package.
    pub min_saving: f64,
    /// Packages whose members expand beyond this get no delta.
    pub max_payload_bytes: u64,
}

impl Default for DeltaConfig {
    fn default() -> Self {
        DeltaConfig { enabled: true, max_deb_bytes: 256 << 20, min_saving: 0.2, max_payload_bytes: 1 << 30 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeltaRecord {
    pub name: String,
    pub arch: String,
    pub from: String,
    pub to: String,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Outcome {
    Built {
        /// Relative to `public/`.
        filename: String,
        size: u64,
        sha256: String,
        base_payload: String,
        result_payload: String,
    },
    Skipped {
        reason: String,
    },
}

impl DeltaRecord {
    pub fn filename(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Built { filename, .. } => Some(filename),
            Outcome::Skipped { .. } => None,
        }
    }

    pub fn is(&self, name: &str, arch: &str, from: &str, to: &str) -> bool {
        self.name == name && self.arch == arch && self.from == from && self.to == to
    }
}

/// A delta to make: the two pool files and where the delta goes.
#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    pub arch: String,
    pub from: Entry,
    pub to: Entry,
}

impl Job {
    /// Where a delta with this SHA-256 goes: the name carries part of the hash, so a delta made
    /// again with other bytes (a newer compressor) never overwrites one an index still lists.
    pub fn filename(&self, sha256: &str) -> String {
        let stem = |v: &str| v.split_once(':').map(|(_, v)| v.to_owned()).unwrap_or_else(|| v.to_owned());
        let deb = crate::store::pool_path(&self.name, &self.to.version, &self.arch);
        let dir = deb.rsplit_once('/').map(|(d, _)| d).unwrap_or("pool");
        let tag = sha256.get(..12).unwrap_or("");
        format!(
            "{dir}/{}_{}_to_{}_{}.{tag}.debdelta",
            self.name,
            stem(&self.from.version),
            stem(&self.to.version),
            self.arch
        )
    }
}

/// The pairs a suite wants and has no record of.
pub fn wanted(entries: &[Entry], records: &[DeltaRecord]) -> Vec<Job> {
    let mut by_key: std::collections::BTreeMap<(&str, &str), Vec<&Entry>> = Default::default();
    for e in entries {
        by_key.entry((&e.name, &e.arch)).or_default().push(e);
    }
    let mut jobs = Vec::new();
    for ((name, arch), mut versions) in by_key {
        versions.sort_by(|a, b| a.version_cmp(b));
        let Some((newest, older)) = versions.split_last() else { continue };
        for old in older {
            if !records.iter().any(|r| r.is(name, arch, &old.version, &newest.version)) {
                jobs.push(Job {
                    name: name.to_owned(),
                    arch: arch.to_owned(),
                    from: (*old).clone(),
                    to: (*newest).clone(),
                });
            }
        }
    }
    jobs
}

/// Drops the records whose versions are no longer in the suite; returns them.
pub fn prune(entries: &[Entry], records: &mut Vec<DeltaRecord>) -> Vec<DeltaRecord> {
    let present = |name: &str, arch: &str, version: &str| {
        entries.iter().any(|e| e.name == name && e.arch == arch && e.version == version)
    };
    let (keep, gone): (Vec<_>, Vec<_>) =
        records.drain(..).partition(|r| present(&r.name, &r.arch, &r.from) && present(&r.name, &r.arch, &r.to));
    *records = keep;
    gone
}

/// Makes one delta from the pool files; `Skipped` when it would not pay.
pub fn build(public: &Path, job: &Job, cfg: &DeltaConfig) -> Result<(Outcome, Option<Vec<u8>>), std::io::Error> {
    let too_large = [&job.from, &job.to].into_iter().find(|e| e.size > cfg.max_deb_bytes);
    if let Some(e) = too_large {
        let reason = format!("{} is {} bytes, over the {} byte limit", e.filename, e.size, cfg.max_deb_bytes);
        return Ok((Outcome::Skipped { reason }, None));
    }
    let old = std::fs::read(public.join(&job.from.filename))?;
    let new = std::fs::read(public.join(&job.to.filename))?;
    let delta = match debfleet_delta::make_limited(&old, &new, cfg.max_payload_bytes) {
        Ok(d) => d,
        Err(e) => return Ok((Outcome::Skipped { reason: format!("cannot make a delta: {e}") }, None)),
    };
    let saving = 1.0 - delta.len() as f64 / new.len().max(1) as f64;
    if saving < cfg.min_saving {
        let reason = format!(
            "the delta ({} bytes) saves {:.0}% of the package ({} bytes), less than {:.0}%",
            delta.len(),
            saving * 100.0,
            new.len(),
            cfg.min_saving * 100.0
        );
        return Ok((Outcome::Skipped { reason }, None));
    }
    let (header, _, _) = debfleet_delta::open(&delta).map_err(std::io::Error::other)?;
    let sha256 = crate::fsutil::sha256_hex(&delta);
    let outcome = Outcome::Built {
        filename: job.filename(&sha256),
        size: delta.len() as u64,
        sha256,
        base_payload: header.base.payload,
        result_payload: header.result.payload,
    };
    Ok((outcome, Some(delta)))
}

/// One architecture's `Deltas` index: a stanza per built delta (`Architecture: all` ones in
/// every architecture, as in Packages), sorted.
pub fn index(records: &[DeltaRecord], arch: &str) -> String {
    let mut chosen: Vec<&DeltaRecord> = records.iter().filter(|r| r.arch == arch || r.arch == "all").collect();
    chosen.sort_by(|a, b| (&a.name, &a.arch, &a.from, &a.to).cmp(&(&b.name, &b.arch, &b.from, &b.to)));
    let mut out = String::new();
    for r in chosen {
        if let Outcome::Built { filename, size, sha256, base_payload, result_payload } = &r.outcome {
            let _ = write!(
                out,
                "Package: {}\nArchitecture: {}\nFrom-Version: {}\nTo-Version: {}\nBase-Payload: {base_payload}\n\
                 Result-Payload: {result_payload}\nFilename: {filename}\nSize: {size}\nSHA256: {sha256}\n\n",
                r.name, r.arch, r.from, r.to
            );
        }
    }
    out
}
