//! The packages debfleet manages on this device: those installed through it plus those the
//! configuration lists, with the versions debfleet installed (newest last), which is what
//! `rollback` without a version goes back to. Kept in `STATE_DIR/managed.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Managed {
    #[serde(skip)]
    path: PathBuf,
    /// name → versions installed through debfleet, oldest first (bounded).
    packages: BTreeMap<String, Vec<String>>,
}

const HISTORY: usize = 10;

impl Managed {
    pub fn load(state_dir: &Path) -> Managed {
        let path = state_dir.join("managed.json");
        let mut m: Managed =
            std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        m.path = path;
        m
    }

    fn save(&self) {
        if let Err(e) = serde_json::to_vec_pretty(self)
            .map_err(std::io::Error::from)
            .and_then(|b| write_atomic(&self.path, &b, true))
        {
            tracing::error!("cannot save {}: {e}", self.path.display());
        }
    }

    /// Every managed package: debfleet's plus the configured ones.
    pub fn names(&self, configured: &[String]) -> Vec<String> {
        let mut all: Vec<String> = self.packages.keys().cloned().chain(configured.iter().cloned()).collect();
        all.sort();
        all.dedup();
        all
    }

    /// Records the outcome of a transaction: versions installed, packages removed.
    pub fn record(&mut self, changes: &[(String, Option<String>)]) {
        for (name, after) in changes {
            match after {
                Some(v) => {
                    let h = self.packages.entry(name.clone()).or_default();
                    if h.last() != Some(v) {
                        h.retain(|x| x != v);
                        h.push(v.clone());
                    }
                    if h.len() > HISTORY {
                        h.remove(0);
                    }
                }
                None => {
                    self.packages.remove(name);
                }
            }
        }
        self.save();
    }

    /// Records a rollback to `version`: later entries are dropped, so rolling back again goes
    /// further back rather than forth.
    pub fn record_rollback(&mut self, name: &str, version: &str) {
        let h = self.packages.entry(name.to_owned()).or_default();
        match h.iter().rposition(|v| v == version) {
            Some(i) => h.truncate(i + 1),
            None => h.push(version.to_owned()),
        }
        self.save();
    }

    /// The version installed before `current`, from debfleet's own history.
    pub fn previous(&self, name: &str, current: Option<&str>) -> Option<String> {
        let h = self.packages.get(name)?;
        let idx = match current {
            Some(c) => h.iter().rposition(|v| v == c)?,
            None => h.len(),
        };
        idx.checked_sub(1).and_then(|i| h.get(i)).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_and_previous_versions() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Managed::load(dir.path());
        m.record(&[("app".into(), Some("1.0".into()))]);
        m.record(&[("app".into(), Some("2.0".into()))]);
        m.record(&[("app".into(), Some("3.0".into()))]);
        assert_eq!(m.previous("app", Some("3.0")).as_deref(), Some("2.0"));
        // Rolled back to 2.0: the next rollback goes further back, to 1.0.
        m.record_rollback("app", "2.0");
        assert_eq!(m.previous("app", Some("2.0")).as_deref(), Some("1.0"));
        m.record_rollback("app", "1.0");
        assert_eq!(m.previous("app", Some("1.0")), None);
        let m2 = Managed::load(dir.path());
        assert_eq!(m2.names(&["bash".into()]), ["app", "bash"]);
        m.record(&[("app".into(), None)]);
        assert!(Managed::load(dir.path()).names(&[]).is_empty());
        assert_eq!(m.previous("nope", None), None);
    }
}
