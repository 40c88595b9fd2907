//! The audit log: every action taken through the web console, one JSON object per line, each
//! line naming the SHA-256 of the line before it (`prev`; the first names 64 zeros). Editing a
//! line breaks the next line's `prev`; removing one breaks the chain where it was; removing the
//! last lines is caught by the head file beside the log (`FILE.head`: the count of lines and the
//! hash of the last), which every append rewrites.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One action, as the log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub ts: String,
    /// The signed-in user who acted (for a remote session: the operator its command named).
    pub user: String,
    /// The user's role; none for what the console saw on the broker (a remote session opened
    /// from the command line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<debfleet_protocol::Role>,
    /// What was asked: `install`, `rollout pause`, `upload`, `login` ...
    pub action: String,
    /// What it was asked of: `device/ID`, `group/G`, `rollout/ID`, `suite/S` ...
    pub target: String,
    /// The arguments, as the operator gave them.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// `ok`, or why it failed.
    pub outcome: String,
}

#[derive(Serialize, Deserialize)]
struct Line {
    prev: String,
    #[serde(flatten)]
    entry: Entry,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("line {line}: {why}")]
    Broken { line: usize, why: String },
}

fn hash(line: &[u8]) -> String {
    Sha256::digest(line).iter().map(|b| format!("{b:02x}")).collect()
}

/// An append-only, hash-chained log file.
pub struct Audit {
    path: PathBuf,
    /// The hash of the last line, and how many lines there are.
    last: String,
    lines: usize,
}

impl Audit {
    /// Opens the log (created when missing) after checking the chain it has.
    pub fn open(path: &Path) -> Result<Audit, AuditError> {
        let (lines, last) = match std::fs::metadata(path) {
            Ok(_) => verify(path)?,
            Err(_) => (0, GENESIS.to_owned()),
        };
        Ok(Audit { path: path.to_owned(), last, lines })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry (flushed to disk before it returns: an action is not taken unlogged).
    pub fn append(&mut self, entry: Entry) -> Result<(), AuditError> {
        let io = |source| AuditError::Io { path: self.path.clone(), source };
        let line =
            serde_json::to_vec(&Line { prev: self.last.clone(), entry }).map_err(|e| io(std::io::Error::other(e)))?;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path).map_err(io)?;
        f.write_all(&[&line[..], b"\n"].concat()).map_err(io)?;
        f.sync_data().map_err(io)?;
        self.last = hash(&line);
        self.lines += 1;
        let head = format!("{} {}\n", self.lines, self.last);
        std::fs::write(head_path(&self.path), head).map_err(io)?;
        Ok(())
    }
}

fn head_path(log: &Path) -> PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(".head");
    PathBuf::from(p)
}

/// Checks the chain line by line, then against the head file when there is one. Returns the
/// number of lines and the last hash.
pub fn verify(path: &Path) -> Result<(usize, String), AuditError> {
    let text = std::fs::read(path).map_err(|source| AuditError::Io { path: path.to_owned(), source })?;
    let mut last = GENESIS.to_owned();
    let mut n = 0;
    for (i, raw) in text.split(|b| *b == b'\n').enumerate() {
        if raw.is_empty() {
            if i + 1 == text.split(|b| *b == b'\n').count() {
                break;
            }
            return Err(AuditError::Broken { line: i + 1, why: "an empty line".into() });
        }
        let line: Line = serde_json::from_slice(raw)
            .map_err(|e| AuditError::Broken { line: i + 1, why: format!("not an audit entry: {e}") })?;
        if line.prev != last {
            let why = if i == 0 {
                "the first line does not start the chain (lines removed before it?)".to_owned()
            } else {
                format!("line {i} is not the line this one followed (edited, removed or inserted)")
            };
            return Err(AuditError::Broken { line: i + 1, why });
        }
        last = hash(raw);
        n += 1;
    }
    match std::fs::read_to_string(head_path(path)) {
        Ok(head) => {
            let mut w = head.split_whitespace();
            let (count, at) = (w.next().and_then(|c| c.parse::<usize>().ok()), w.next());
            if count != Some(n) || at != Some(last.as_str()) {
                return Err(AuditError::Broken {
                    line: n,
                    why: format!(
                        "the log ends after {n} line(s) but its head file says {} (lines removed from the end?)",
                        count.map_or("something else".to_owned(), |c| c.to_string())
                    ),
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && n == 0 => {}
        Err(e) => return Err(AuditError::Io { path: head_path(path), source: e }),
    }
    Ok((n, last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use debfleet_protocol::Role;

    fn entry(action: &str) -> Entry {
        Entry {
            ts: "2026-12-04T10:00:00.000Z".into(),
            user: "ana".into(),
            role: Some(Role::Operator),
            action: action.into(),
            target: "device/lab-1".into(),
            detail: "hello=2.0".into(),
            outcome: "ok".into(),
        }
    }

    #[test]
    fn a_chain_verifies_and_any_edit_or_removal_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        let mut a = Audit::open(&log).unwrap();
        for action in ["install", "ping", "rollback", "uninstall"] {
            a.append(entry(action)).unwrap();
        }
        assert_eq!(verify(&log).unwrap().0, 4);
        // Reopening goes on from where it was.
        let mut again = Audit::open(&log).unwrap();
        again.append(entry("restart")).unwrap();
        assert_eq!(verify(&log).unwrap().0, 5);
        let good = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = good.lines().collect();
        let check = |text: String| {
            std::fs::write(&log, text).unwrap();
            verify(&log).unwrap_err().to_string()
        };
        // An edited line: the next one no longer follows it.
        let edited = good.replacen("\"uninstall\"", "\"ping\"", 1);
        assert!(check(edited).starts_with("line 5:"));
        // A line removed in the middle, at the start, at the end.
        let without =
            |i: usize| lines.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, l)| format!("{l}\n")).collect();
        assert!(check(without(2)).starts_with("line 3:"));
        assert!(check(without(0)).contains("does not start the chain"));
        assert!(check(without(4)).contains("lines removed from the end"));
        assert!(check(good.replace("\n", "\n\n")).contains("empty line"));
        std::fs::write(&log, &good).unwrap();
        assert_eq!(verify(&log).unwrap().0, 5);
    }
}
