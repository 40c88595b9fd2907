//! Local users of the web console: `NAME ROLE PHC-HASH` per line (argon2id, its own salt and
//! parameters in the PHC string), written by `debfleet web user add`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use debfleet_protocol::Role;

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} line {line}: {why}")]
    Bad { path: PathBuf, line: usize, why: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone)]
struct User {
    role: Role,
    hash: String,
}

pub struct Users {
    path: PathBuf,
    users: BTreeMap<String, User>,
}

/// Checked against when the name is unknown, so that a wrong name costs what a wrong password
/// costs (no timing tells which names exist). Made once, on the first check: reading the users
/// file stays cheap enough to do on every request.
fn decoy() -> Option<&'static str> {
    static DECOY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash_password("a password nobody has").ok()).as_deref()
}

/// A user name: 1 to 32 of `a-z 0-9 . _ -`, starting with a letter or digit.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
}

fn hash_password(password: &str) -> Result<String, UserError> {
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).map_err(|e| UserError::Invalid(format!("no randomness for a salt: {e}")))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| UserError::Invalid(e.to_string()))?;
    // Argon2::default() is argon2id, version 0x13, the crate's (RFC 9106 second) parameters.
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| UserError::Invalid(e.to_string()))
}

impl Users {
    /// Reads the file (none yet: no users, and nobody can sign in).
    pub fn load(path: &Path) -> Result<Users, UserError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(UserError::Io { path: path.to_owned(), source }),
        };
        let mut users = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| UserError::Bad { path: path.to_owned(), line: i + 1, why: why.into() };
            let mut w = line.split_whitespace();
            let (Some(name), Some(role), Some(hash), None) = (w.next(), w.next(), w.next(), w.next()) else {
                return Err(bad("expected NAME ROLE HASH"));
            };
            let role = Role::parse(role).ok_or_else(|| bad("the role is not viewer, operator or admin"))?;
            if !valid_name(name) {
                return Err(bad("not a user name"));
            }
            PasswordHash::new(hash).map_err(|e| bad(&format!("not a password hash: {e}")))?;
            users.insert(name.to_owned(), User { role, hash: hash.to_owned() });
        }
        Ok(Users { path: path.to_owned(), users })
    }

    /// Nobody: what a server falls back to when its users cannot be read at all.
    fn empty(path: &Path) -> Users {
        Users { path: path.to_owned(), users: BTreeMap::new() }
    }

    /// The user's role, if the user exists.
    pub fn role(&self, name: &str) -> Option<Role> {
        self.users.get(name).map(|u| u.role)
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Adds the user, or changes their role and password; writes the file (mode 0600).
    pub fn add(&mut self, name: &str, role: Role, password: &str) -> Result<(), UserError> {
        if !valid_name(name) {
            return Err(UserError::Invalid(format!("{name:?} is not a user name (a-z 0-9 . _ -, at most 32)")));
        }
        if password.chars().count() < 8 {
            return Err(UserError::Invalid("a password has at least 8 characters".into()));
        }
        let hash = hash_password(password)?;
        self.users.insert(name.to_owned(), User { role, hash });
        self.save()
    }

    fn save(&self) -> Result<(), UserError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| UserError::Io { path: self.path.clone(), source };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let text: String = self.users.iter().map(|(n, u)| format!("{n} {} {}\n", u.role.as_str(), u.hash)).collect();
        let tmp = self.path.with_extension("tmp");
        let mut f =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
        std::io::Write::write_all(&mut f, text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)
    }

    /// The user's role when the password is theirs.
    pub fn check(&self, name: &str, password: &str) -> Option<Role> {
        let (hash, role) = match self.users.get(name) {
            Some(u) => (u.hash.as_str(), Some(u.role)),
            None => (decoy()?, None),
        };
        let parsed = PasswordHash::new(hash).ok()?;
        let ok = Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok();
        role.filter(|_| ok)
    }
}

/// The users file as the running server sees it: read again when it changes, so a user added
/// with `debfleet web user add` can sign in without a restart. A file that no longer reads is
/// reported and the users read before are kept.
pub struct UsersFile {
    path: PathBuf,
    current: Mutex<(Option<SystemTime>, Arc<Users>)>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl UsersFile {
    pub fn open(path: &Path) -> Result<UsersFile, UserError> {
        let stamp = modified(path);
        let users = Users::load(path)?;
        Ok(UsersFile { path: path.to_owned(), current: Mutex::new((stamp, Arc::new(users))) })
    }

    pub fn current(&self) -> Arc<Users> {
        let Ok(mut cur) = self.current.lock() else {
            // Poisoned only by a panic while reloading; the file is read again below.
            return Arc::new(Users::load(&self.path).unwrap_or_else(|_| Users::empty(&self.path)));
        };
        let stamp = modified(&self.path);
        if stamp != cur.0 {
            match Users::load(&self.path) {
                Ok(users) => *cur = (stamp, Arc::new(users)),
                Err(e) => {
                    tracing::warn!("{e}; keeping the users read before");
                    cur.0 = stamp;
                }
            }
        }
        cur.1.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_kept_hashed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        let mut u = Users::load(&path).unwrap();
        assert!(u.is_empty());
        u.add("ana", Role::Admin, "correct horse").unwrap();
        u.add("bo", Role::Viewer, "battery staple").unwrap();
        assert!(u.add("Bad Name", Role::Viewer, "long enough").is_err());
        assert!(u.add("cy", Role::Viewer, "short").is_err());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("ana admin $argon2id$") && !text.contains("correct horse"), "{text}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let again = Users::load(&path).unwrap();
        assert_eq!(again.check("ana", "correct horse"), Some(Role::Admin));
        assert_eq!(again.check("bo", "battery staple"), Some(Role::Viewer));
        assert_eq!(again.check("ana", "battery staple"), None);
        assert_eq!(again.check("nobody", "correct horse"), None);
        std::fs::write(&path, "ana superuser $argon2id$x\n").unwrap();
        assert!(Users::load(&path).err().unwrap().to_string().contains("line 1"));
    }

    #[test]
    fn a_running_server_sees_users_added_later_and_keeps_its_users_when_the_file_breaks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        let file = UsersFile::open(&path).unwrap();
        assert!(file.current().is_empty());
        Users::load(&path).unwrap().add("ana", Role::Operator, "correct horse").unwrap();
        assert_eq!(file.current().check("ana", "correct horse"), Some(Role::Operator));
        // Another modification time, so the change is seen whatever the file system's clock grain.
        std::fs::write(&path, "garbage\n").unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(later).unwrap();
        assert_eq!(file.current().check("ana", "correct horse"), Some(Role::Operator));
    }
}
