//! The operation journal: one file per operation id under `STATE_DIR/ops/`, written before an
//! operation starts and on every state change. It deduplicates ids across restarts, keeps the
//! outcomes the broker must (re)receive, and decides which records stay retained.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use debfleet_protocol::time::{format_unix_ms, parse_unix_ms};
use debfleet_protocol::{ErrorCode, OpError, OpId, OpRecord, OpState, CONTRACT_VERSION};
use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub record: OpRecord,
    /// Whether the record should be retained on the broker.
    pub retained: bool,
    /// When it stopped being retained (Unix ms); clears are re-sent after reconnects for a while.
    #[serde(default)]
    pub unretained_at: Option<i64>,
    /// Order of arrival, for eviction.
    pub seq: u64,
    /// Packages a package operation works on, so that an interrupted one can be reconciled
    /// with dpkg's database on the next start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
    /// A transaction handed to a transient unit (the agent upgrading itself): whoever runs
    /// after it — this agent or its successor — reads the unit's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<Handoff>,
    /// An instant command (no job, no effect a crash could cut in half): only its final record
    /// goes to disk, unflushed.
    #[serde(skip)]
    pub instant: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    pub unit: String,
    /// Installed versions before the transaction, to report what changed.
    pub before: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("operation journal {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

pub struct Journal {
    dir: PathBuf,
    entries: BTreeMap<OpId, Entry>,
    next_seq: u64,
    capacity: usize,
}

/// How long after unretaining a record its empty retained message is re-sent on reconnect, in
/// case the first clear was lost with a connection.
pub const RESEND_CLEARS_MS: i64 = 3_600_000;

impl Journal {
    /// Opens (creating) the journal. Operations that were not finished when the agent stopped
    /// are finished here as `failed`/`interrupted`: nothing stays `running` forever.
    pub fn open(dir: &Path, capacity: usize, now_ms: i64) -> Result<(Journal, Vec<OpId>), JournalError> {
        let io_err = |source| JournalError::Io { path: dir.to_owned(), source };
        fs::create_dir_all(dir).map_err(io_err)?;
        let mut entries = BTreeMap::new();
        for item in fs::read_dir(dir).map_err(io_err)? {
            let path = item.map_err(io_err)?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Entry>(&b).ok()) {
                Some(e) if path.file_stem().and_then(|s| s.to_str()) == Some(e.record.id.as_str()) => {
                    entries.insert(e.record.id.clone(), e);
                }
                _ => {
                    tracing::warn!("moving unreadable journal file {} aside", path.display());
                    let _ = fs::rename(&path, path.with_extension("corrupt"));
                }
            }
        }
        let next_seq = entries.values().map(|e| e.seq + 1).max().unwrap_or(0);
        let mut journal = Journal { dir: dir.to_owned(), entries, next_seq, capacity };
        // Operations handed to a transient unit are finished from that unit's result instead.
        let unfinished: Vec<OpId> = journal
            .entries
            .values()
            .filter(|e| !e.record.state.is_final() && e.handoff.is_none())
            .map(|e| e.record.id.clone())
            .collect();
        for id in &unfinished {
            let message = "the agent stopped before this operation finished".to_owned();
            journal.finish(id, now_ms, Err(OpError { code: ErrorCode::Interrupted, message }))?;
        }
        Ok((journal, unfinished))
    }

    pub fn get(&self, id: &OpId) -> Option<&Entry> {
        self.entries.get(id)
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    fn path(&self, id: &OpId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn save(&self, id: &OpId, durable: bool) -> Result<(), JournalError> {
        let entry = &self.entries[id];
        if entry.instant && !entry.record.state.is_final() {
            return Ok(());
        }
        let bytes = serde_json::to_vec(entry).expect("journal entry serializes");
        let path = self.path(id);
        write_atomic(&path, &bytes, durable).map_err(|source| JournalError::Io { path, source })
    }

    /// Records a new operation as accepted — durably before anything runs, or, for an `instant`
    /// command, in memory only.
    /// Evicts the oldest entries beyond capacity; returns the ids whose retained records must be
    /// cleared.
    pub fn accept(
        &mut self,
        id: OpId,
        verb: &str,
        by: Option<String>,
        now_ms: i64,
        instant: bool,
    ) -> Result<Vec<OpId>, JournalError> {
        let now = format_unix_ms(now_ms);
        let record = OpRecord {
            v: CONTRACT_VERSION,
            id: id.clone(),
            verb: verb.to_owned(),
            state: OpState::Accepted,
            accepted_at: now.clone(),
            updated_at: now,
            phase: None,
            percent: None,
            result: None,
            error: None,
            by,
            repeats: 0,
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.insert(
            id.clone(),
            Entry { record, retained: true, unretained_at: None, seq, packages: Vec::new(), handoff: None, instant },
        );
        self.save(&id, true)?;
        self.evict()
    }

    fn evict(&mut self) -> Result<Vec<OpId>, JournalError> {
        let mut cleared = Vec::new();
        while self.entries.len() > self.capacity {
            let oldest = self
                .entries
                .values()
                .filter(|e| e.record.state.is_final())
                .min_by_key(|e| e.seq)
                .map(|e| e.record.id.clone());
            let Some(id) = oldest else { break };
            let entry = self.entries.remove(&id).expect("present");
            let path = self.path(&id);
            fs::remove_file(&path).map_err(|source| JournalError::Io { path, source })?;
            if entry.retained {
                cleared.push(id);
            }
        }
        Ok(cleared)
    }

    pub fn set_running(
        &mut self,
        id: &OpId,
        now_ms: i64,
        phase: Option<debfleet_protocol::Phase>,
    ) -> Result<(), JournalError> {
        if let Some(e) = self.entries.get_mut(id) {
            e.record.state = OpState::Running;
            e.record.phase = phase;
            e.record.updated_at = format_unix_ms(now_ms);
            self.save(id, false)?;
        }
        Ok(())
    }

    /// What a running operation tells before it ends (a session's key), kept with it.
    pub fn set_result(&mut self, id: &OpId, now_ms: i64, result: serde_json::Value) -> Result<(), JournalError> {
        if let Some(e) = self.entries.get_mut(id) {
            e.record.result = Some(result);
            e.record.updated_at = format_unix_ms(now_ms);
            self.save(id, false)?;
        }
        Ok(())
    }

    pub fn finish(
        &mut self,
        id: &OpId,
        now_ms: i64,
        outcome: Result<serde_json::Value, OpError>,
    ) -> Result<(), JournalError> {
        self.finish_outcome(id, now_ms, outcome, true)
    }

    /// Finishes an instant command (ping, cfg, clear): written, not flushed. The record survives
    /// a restart of the agent; a power cut may forget it, and running such a command again has no
    /// effect beyond its answer (cfg's own change is flushed with the configuration).
    pub fn finish_instant(
        &mut self,
        id: &OpId,
        now_ms: i64,
        outcome: Result<serde_json::Value, OpError>,
    ) -> Result<(), JournalError> {
        self.finish_outcome(id, now_ms, outcome, false)
    }

    fn finish_outcome(
        &mut self,
        id: &OpId,
        now_ms: i64,
        outcome: Result<serde_json::Value, OpError>,
        durable: bool,
    ) -> Result<(), JournalError> {
        let (result, error) = match outcome {
            Ok(r) => (Some(r), None),
            Err(e) => (None, Some(e)),
        };
        self.finish_as(id, now_ms, result, error, durable)
    }

    /// Finishes an operation; a failed one may still carry a result (what a rolled-back change
    /// did). Durable: the outcome survives a power cut.
    pub fn finish_with(
        &mut self,
        id: &OpId,
        now_ms: i64,
        result: Option<serde_json::Value>,
        error: Option<OpError>,
    ) -> Result<(), JournalError> {
        self.finish_as(id, now_ms, result, error, true)
    }

    fn finish_as(
        &mut self,
        id: &OpId,
        now_ms: i64,
        result: Option<serde_json::Value>,
        error: Option<OpError>,
        durable: bool,
    ) -> Result<(), JournalError> {
        if let Some(e) = self.entries.get_mut(id) {
            let r = &mut e.record;
            r.updated_at = format_unix_ms(now_ms);
            r.phase = None;
            r.percent = None;
            r.state = match &error {
                Some(e) if e.code == debfleet_protocol::ErrorCode::Expired => OpState::Expired,
                Some(_) => OpState::Failed,
                None => OpState::Succeeded,
            };
            r.result = result;
            r.error = error;
            self.save(id, durable)?;
        }
        Ok(())
    }

    /// Progress of a running operation (not flushed to disk: a lost progress note is harmless).
    pub fn progress(
        &mut self,
        id: &OpId,
        now_ms: i64,
        phase: debfleet_protocol::Phase,
        percent: Option<u8>,
    ) -> Result<(), JournalError> {
        if let Some(e) = self.entries.get_mut(id) {
            e.record.state = OpState::Running;
            e.record.phase = Some(phase);
            e.record.percent = percent;
            e.record.updated_at = format_unix_ms(now_ms);
            self.save(id, false)?;
        }
        Ok(())
    }

    /// Notes the packages an operation is about to change (durable: it precedes the change).
    pub fn set_packages(&mut self, id: &OpId, packages: Vec<String>) -> Result<(), JournalError> {
        if let Some(e) = self.entries.get_mut(id) {
            e.packages = packages;
            self.save(id, true)?;
        }
        Ok(())
    }

    /// Records, durably, that a transient unit now carries the operation.
    pub fn set_handoff(&mut self, id: &OpId, handoff: Handoff) -> Result<(), JournalError> {
        if let Some(e) = self.entries.get_mut(id) {
            e.handoff = Some(handoff);
            self.save(id, true)?;
        }
        Ok(())
    }

    /// Unfinished operations carried by transient units.
    pub fn handoffs(&self) -> Vec<(OpId, Handoff)> {
        self.entries
            .values()
            .filter(|e| !e.record.state.is_final())
            .filter_map(|e| e.handoff.clone().map(|h| (e.record.id.clone(), h)))
            .collect()
    }

    /// The verb of an operation the journal knows.
    pub fn verb(&self, id: &OpId) -> Option<&str> {
        self.entries.get(id).map(|e| e.record.verb.as_str())
    }

    /// Counts a repeated id and makes its record retained again: the sender gets the recorded
    /// outcome instead of a second execution.
    pub fn repeat(&mut self, id: &OpId) -> Result<(), JournalError> {
        if let Some(e) = self.entries.get_mut(id) {
            e.record.repeats = e.record.repeats.saturating_add(1);
            e.retained = true;
            e.unretained_at = None;
            self.save(id, false)?;
        }
        Ok(())
    }

    pub fn unretain(&mut self, id: &OpId, now_ms: i64) -> Result<bool, JournalError> {
        match self.entries.get_mut(id) {
            Some(e) if e.retained => {
                e.retained = false;
                e.unretained_at = Some(now_ms);
                self.save(id, false)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Finished, retained records past their keep time or beyond the retained cap (oldest
    /// first): the caller unretains them.
    pub fn due_for_unretain(&self, now_ms: i64, keep_ms: i64, max_retained: usize) -> Vec<OpId> {
        let mut retained: Vec<&Entry> = self.entries.values().filter(|e| e.retained).collect();
        retained.sort_by_key(|e| e.seq);
        let excess = retained.len().saturating_sub(max_retained);
        retained
            .iter()
            .enumerate()
            .filter(|(i, e)| {
                let finished = e.record.state.is_final();
                let age = parse_unix_ms(&e.record.updated_at).map(|t| now_ms - t).unwrap_or(i64::MAX);
                finished && (*i < excess || age > keep_ms)
            })
            .map(|(_, e)| e.record.id.clone())
            .collect()
    }

    /// Finished records selected by a `clear` command.
    pub fn clearable(&self, ids: &[OpId], older_than_ms: Option<i64>, now_ms: i64) -> (Vec<OpId>, Vec<OpId>) {
        let mut clear = Vec::new();
        let mut skipped = Vec::new();
        if !ids.is_empty() {
            for id in ids {
                match self.entries.get(id) {
                    Some(e) if e.retained && e.record.state.is_final() => clear.push(id.clone()),
                    _ => skipped.push(id.clone()),
                }
            }
            return (clear, skipped);
        }
        for e in self.entries.values().filter(|e| e.retained && e.record.state.is_final()) {
            let age = parse_unix_ms(&e.record.updated_at).map(|t| now_ms - t).unwrap_or(i64::MAX);
            if older_than_ms.is_none_or(|min| age >= min) {
                clear.push(e.record.id.clone());
            }
        }
        (clear, skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id(s: &str) -> OpId {
        OpId::new(s).unwrap()
    }

    #[test]
    fn survives_reopen_and_finishes_interrupted_ops() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut j, _) = Journal::open(dir.path(), 10, 1000).unwrap();
            j.accept(id("a"), "ping", None, 1000, false).unwrap();
            j.finish(&id("a"), 1001, Ok(json!({"ok": true}))).unwrap();
            j.accept(id("b"), "cfg", None, 1002, false).unwrap();
            j.set_running(&id("b"), 1003, None).unwrap();
        }
        let (j, interrupted) = Journal::open(dir.path(), 10, 2000).unwrap();
        assert_eq!(interrupted, vec![id("b")]);
        assert_eq!(j.get(&id("a")).unwrap().record.state, OpState::Succeeded);
        let b = &j.get(&id("b")).unwrap().record;
        assert_eq!((b.state, b.error.as_ref().unwrap().code), (OpState::Failed, ErrorCode::Interrupted));
    }

    #[test]
    fn corrupt_files_are_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("x.json"), b"{garbage").unwrap();
        let (j, _) = Journal::open(dir.path(), 10, 0).unwrap();
        assert_eq!(j.entries().count(), 0);
        assert!(dir.path().join("x.corrupt").exists());
    }

    #[test]
    fn capacity_evicts_oldest_finished() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), 2, 0).unwrap();
        for (n, name) in ["a", "b", "c"].iter().enumerate() {
            let evicted = j.accept(id(name), "ping", None, n as i64, false).unwrap();
            j.finish(&id(name), n as i64, Ok(json!(null))).unwrap();
            assert_eq!(evicted, if n == 2 { vec![id("a")] } else { vec![] });
        }
        assert!(j.get(&id("a")).is_none());
        assert!(!dir.path().join("a.json").exists());
    }

    #[test]
    fn unretain_by_age_and_cap() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), 10, 0).unwrap();
        for (n, name) in ["a", "b", "c"].iter().enumerate() {
            j.accept(id(name), "ping", None, n as i64 * 1000, false).unwrap();
            j.finish(&id(name), n as i64 * 1000, Ok(json!(null))).unwrap();
        }
        j.accept(id("running"), "ping", None, 0, false).unwrap();
        assert_eq!(j.due_for_unretain(2500, 10_000, 2), vec![id("a"), id("b")]);
        assert_eq!(j.due_for_unretain(2500, 1_000, 10), vec![id("a"), id("b")]);
        assert!(j.unretain(&id("a"), 3000).unwrap());
        assert!(!j.unretain(&id("a"), 3000).unwrap());
        let (clear, skipped) = j.clearable(&[id("b"), id("running"), id("zz")], None, 3000);
        assert_eq!((clear, skipped), (vec![id("b")], vec![id("running"), id("zz")]));
    }
}
