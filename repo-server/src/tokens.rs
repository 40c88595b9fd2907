//! Publish tokens: one per team, with a name, stored only as SHA-256 hashes, revocable, and
//! scoped (the package names and suites the team may change; unscoped tokens may change all).
//! The file is read on every check, so a revocation takes effect at once, without a restart.

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
    #[serde(default, flatten)]
    pub scope: Scope,
}

/// What a token may change. An empty list allows everything of its kind; a package pattern is a
/// name or a prefix ending in `*` (`acme-*`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub suites: Vec<String>,
}

impl Scope {
    pub fn new(packages: Vec<String>, suites: Vec<String>) -> Result<Scope> {
        for p in &packages {
            let name = p.strip_suffix('*').unwrap_or(p);
            let ok = if p.ends_with('*') {
                !name.is_empty()
                    && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
            } else {
                crate::control::valid_package_name(name)
            };
            if !ok {
                bail!("package pattern {p:?} must be a package name or a prefix ending in '*'");
            }
        }
        for s in &suites {
            if !crate::control::valid_suite(s) {
                bail!("suite {s:?} must match [a-z0-9][a-z0-9.-]*");
            }
        }
        Ok(Scope { packages, suites })
    }

    pub fn is_unscoped(&self) -> bool {
        self.packages.is_empty() && self.suites.is_empty()
    }

    /// Whether a change to `package` in `suite` is within the scope; the refusal says why.
    pub fn allows(&self, package: &str, suite: &str) -> Result<(), String> {
        let package_ok = self.packages.is_empty()
            || self.packages.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => package.starts_with(prefix),
                None => p == package,
            });
        if !package_ok {
            return Err(format!("this token may change only packages {}, not {package}", self.packages.join(", ")));
        }
        if !self.suites.is_empty() && !self.suites.iter().any(|s| s == suite) {
            return Err(format!("this token may change only suites {}, not {suite}", self.suites.join(", ")));
        }
        Ok(())
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_unscoped() {
            return f.write_str("every package and suite");
        }
        let list = |l: &[String]| if l.is_empty() { "all".to_owned() } else { l.join(",") };
        write!(f, "packages {} suites {}", list(&self.packages), list(&self.suites))
    }
}

/// Who presented a token: the team's name and what it may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Team {
    pub name: String,
    pub scope: Scope,
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
    pub fn add(&self, name: &str, scope: Scope) -> Result<String> {
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
            scope,
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

    /// The team whose token this is.
    pub fn check(&self, presented: Option<&str>) -> Result<Team, AuthError> {
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
            None => Ok(Team { name: rec.name.clone(), scope: rec.scope.clone() }),
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
        let token = t.add("team-a", Scope::default()).unwrap();
        assert_eq!(t.check(Some(&token)).map(|t| t.name), Ok("team-a".into()));
        assert_eq!(t.check(Some("dfr_nope")), Err(AuthError::Unknown));
        assert_eq!(t.check(None), Err(AuthError::Missing));
        assert!(t.add("team-a", Scope::default()).is_err());
        assert!(t.add("bad name", Scope::default()).is_err());
        t.revoke("team-a").unwrap();
        assert_eq!(t.check(Some(&token)), Err(AuthError::Revoked("team-a".into())));
        assert!(!std::fs::read_to_string(dir.path().join("tokens.json")).unwrap().contains(&token));
    }

    #[test]
    fn a_scoped_token_reaches_only_its_packages_and_suites() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tokens::new(&dir.path().join("tokens.json"));
        let scope = Scope::new(vec!["acme-*".into(), "acmectl".into()], vec!["testing".into()]).unwrap();
        let token = t.add("acme", scope.clone()).unwrap();
        let team = t.check(Some(&token)).unwrap();
        assert_eq!(team.scope, scope, "the scope survives the file");
        assert_eq!(team.scope.allows("acme-led", "testing"), Ok(()));
        assert_eq!(team.scope.allows("acmectl", "testing"), Ok(()));
        assert!(team.scope.allows("acmectl2", "testing").unwrap_err().contains("not acmectl2"));
        assert!(team.scope.allows("other", "testing").is_err());
        assert!(team.scope.allows("acme-led", "stable").unwrap_err().contains("not stable"));
        assert!(Scope::default().allows("anything", "any").is_ok());
        assert!(Scope::new(vec!["*".into()], vec![]).is_err(), "a bare * is spelled as no scope");
        assert!(Scope::new(vec!["Bad".into()], vec![]).is_err());
        assert!(Scope::new(vec![], vec!["../x".into()]).is_err());
        // Tokens written before scopes existed read as unscoped.
        std::fs::write(dir.path().join("old.json"), r#"[{"name":"old","sha256":"00","created":"x"}]"#).unwrap();
        let old = Tokens::new(&dir.path().join("old.json")).list().unwrap();
        assert!(old[0].scope.is_unscoped());
    }
}
