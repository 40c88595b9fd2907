//! Publish tokens: one per team, with a name, stored only as SHA-256 hashes, revocable. The file
//! is read on every check, so a revocation takes effect at once, without a restart.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::fsutil::{hex, sha256_hex, write_private};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    pub sha256: String,
    pub created: String,
    #[serde(default)]
    pub revoked: Option<String>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token: send Authorization: Bearer TOKEN")]
    Missing,
    #[error("unknown token")]
    Unknown,
    #[error("token {0:?} was revoked")]
    Revoked(String),
}

pub struct Tokens {
    path: PathBuf,
}

fn now() -> String {
    httpdate::fmt_http_date(std::time::SystemTime::now())
}

fn valid_token_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl Tokens {
    pub fn new(path: &Path) -> Tokens {
        Tokens { path: path.to_owned() }
    }

    pub fn list(&self) -> Result<Vec<TokenRecord>> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("parsing {}", self.path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.path.display())),
        }
    }

    fn save(&self, list: &[TokenRecord]) -> Result<()> {
        write_private(&self.path, &serde_json::to_vec_pretty(list)?)?;
        Ok(())
    }

    /// Creates a token and returns it; only its hash is stored.
    pub fn add(&self, name: &str) -> Result<String> {
        if !valid_token_name(name) {
            bail!("token name {name:?} must be 1-64 letters, digits, '-', '_' or '.'");
        }
        let mut list = self.list()?;
        if list.iter().any(|t| t.name == name && t.revoked.is_none()) {
            bail!("a token named {name:?} exists; revoke it first");
        }
        let mut raw = [0u8; 24];
        getrandom::getrandom(&mut raw).context("no randomness for the token")?;
        let token = format!("dfr_{}", hex(&raw));
        list.push(TokenRecord {
            name: name.into(),
            sha256: sha256_hex(token.as_bytes()),
            created: now(),
            revoked: None,
        });
        self.save(&list)?;
        Ok(token)
    }

    pub fn revoke(&self, name: &str) -> Result<()> {
        let mut list = self.list()?;
        let mut found = false;
        for t in list.iter_mut().filter(|t| t.name == name && t.revoked.is_none()) {
            t.revoked = Some(now());
            found = true;
        }
        if !found {
            bail!("no active token named {name:?}");
        }
        self.save(&list)
    }

    /// The name of the team whose token this is.
    pub fn check(&self, presented: Option<&str>) -> Result<String, AuthError> {
        let token = presented.ok_or(AuthError::Missing)?;
        let hash = sha256_hex(token.as_bytes());
        let list = self.list().map_err(|e| {
            tracing::error!("{e:#}");
            AuthError::Unknown
        })?;
        let rec =
            list.iter().find(|t| constant_time_eq(t.sha256.as_bytes(), hash.as_bytes())).ok_or(AuthError::Unknown)?;
        match &rec.revoked {
            Some(_) => Err(AuthError::Revoked(rec.name.clone())),
            None => Ok(rec.name.clone()),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_check_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tokens::new(&dir.path().join("tokens.json"));
        let token = t.add("team-a").unwrap();
        assert_eq!(t.check(Some(&token)), Ok("team-a".into()));
        assert_eq!(t.check(Some("dfr_nope")), Err(AuthError::Unknown));
        assert_eq!(t.check(None), Err(AuthError::Missing));
        assert!(t.add("team-a").is_err());
        assert!(t.add("bad name").is_err());
        t.revoke("team-a").unwrap();
        assert_eq!(t.check(Some(&token)), Err(AuthError::Revoked("team-a".into())));
        assert!(!std::fs::read_to_string(dir.path().join("tokens.json")).unwrap().contains(&token));
    }
}
