//! `debfleet broker`: what a real Mosquitto needs so that each device reaches only its own
//! topics and each console only what its role allows. One state file (`broker.json`: every
//! client, its kind and its password hash) is the truth; `passwd` (Mosquitto's own PBKDF2-SHA512
//! format, `$7$`) and `acl` are rendered from it after every change, each replaced atomically.
//! Mosquitto reads both again on SIGHUP.
//!
//! The rules (decision 0011): a device writes only its own facts under `PREFIX/device/ID/`
//! (never `cmd/`), reads only its own, its groups' and the fleet's command topics and desired
//! state; a `viewer` reads everything; an `operator` also publishes commands; an `admin` also
//! desired state and rollouts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use debfleet_protocol::ids::{DeviceId, GroupName};
use debfleet_protocol::Role;
use serde::{Deserialize, Serialize};

/// Mosquitto 2's iteration count for `$7$` hashes (what `mosquitto_passwd` writes).
const PBKDF2_ROUNDS: u32 = 101;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Kind {
    Device { groups: Vec<String> },
    Console { role: Role },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Client {
    #[serde(flatten)]
    kind: Kind,
    /// The `$7$...` hash, as it goes into the password file.
    hash: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    prefix: String,
    clients: BTreeMap<String, Client>,
}

pub struct BrokerDir {
    dir: PathBuf,
    state: State,
}

impl BrokerDir {
    pub fn init(dir: &Path, prefix: &str) -> Result<BrokerDir> {
        if dir.join("broker.json").exists() {
            bail!("{} already holds a broker configuration", dir.display());
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let b = BrokerDir { dir: dir.to_owned(), state: State { prefix: prefix.to_owned(), clients: BTreeMap::new() } };
        b.save()?;
        Ok(b)
    }

    pub fn open(dir: &Path) -> Result<BrokerDir> {
        let path = dir.join("broker.json");
        let bytes = std::fs::read(&path)
            .with_context(|| format!("{} is not a broker configuration (debfleet broker init)", dir.display()))?;
        let state = serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
        Ok(BrokerDir { dir: dir.to_owned(), state })
    }

    pub fn passwd_path(&self) -> PathBuf {
        self.dir.join("passwd")
    }

    pub fn acl_path(&self) -> PathBuf {
        self.dir.join("acl")
    }

    /// Adds a device (or changes its groups); a new password unless `keep_password` and it
    /// exists. Returns the password when one was made.
    pub fn add_device(&mut self, id: &str, groups: &[String], keep_password: bool) -> Result<Option<String>> {
        DeviceId::new(id).map_err(|e| anyhow::anyhow!("device id {id:?}: {e}"))?;
        for g in groups {
            GroupName::new(g.clone()).map_err(|e| anyhow::anyhow!("group {g:?}: {e}"))?;
        }
        let kind = Kind::Device { groups: groups.to_vec() };
        self.put(id, kind, None, keep_password)
    }

    /// Adds a console user (or changes its role); `password` given, or made.
    pub fn add_user(&mut self, name: &str, role: Role, password: Option<String>) -> Result<Option<String>> {
        check_user_name(name)?;
        self.put(name, Kind::Console { role }, password, false)
    }

    fn put(&mut self, name: &str, kind: Kind, password: Option<String>, keep: bool) -> Result<Option<String>> {
        if let Some(old) = self.state.clients.get(name) {
            if std::mem::discriminant(&old.kind) != std::mem::discriminant(&kind) {
                bail!("{name:?} is already a {} (one name space for devices and users)", old.kind.word());
            }
        }
        let made = match (keep, self.state.clients.get(name)) {
            (true, Some(old)) => {
                let hash = old.hash.clone();
                self.state.clients.insert(name.to_owned(), Client { kind, hash });
                None
            }
            _ => {
                let password = match password {
                    Some(p) if p.len() < 12 => bail!("the password must have at least 12 characters"),
                    Some(p) => p,
                    None => random_password()?,
                };
                self.state.clients.insert(name.to_owned(), Client { kind, hash: mosquitto_hash(&password)? });
                Some(password)
            }
        };
        self.save()?;
        Ok(made)
    }

    pub fn remove(&mut self, name: &str) -> Result<()> {
        if self.state.clients.remove(name).is_none() {
            bail!("no device or user {name:?}");
        }
        self.save()
    }

    pub fn list(&self) -> impl Iterator<Item = (&str, &Kind)> {
        self.state.clients.iter().map(|(n, c)| (n.as_str(), &c.kind))
    }

    /// The lines a Mosquitto configuration needs to use these files.
    pub fn mosquitto_lines(&self) -> String {
        format!(
            "# debfleet: per-client passwords and ACLs (debfleet broker ...; reload with SIGHUP)\n\
             per_listener_settings false\n\
             allow_anonymous false\n\
             password_file {}\n\
             acl_file {}\n",
            self.passwd_path().display(),
            self.acl_path().display()
        )
    }

    fn save(&self) -> Result<()> {
        write_private(&self.dir.join("broker.json"), &serde_json::to_vec_pretty(&self.state)?, false)?;
        let mut passwd = String::new();
        for (name, c) in &self.state.clients {
            passwd.push_str(&format!("{name}:{}\n", c.hash));
        }
        write_private(&self.passwd_path(), passwd.as_bytes(), true)?;
        write_private(&self.acl_path(), self.acl().as_bytes(), true)?;
        Ok(())
    }

    /// The ACL file, in Mosquitto's syntax (every rule literal: no `%u` patterns, so a console
    /// user can never be taken for a device).
    pub fn acl(&self) -> String {
        let p = &self.state.prefix;
        let mut out =
            String::from("# Generated by debfleet broker: edit with debfleet broker add-device/add-user/remove.\n");
        for (name, c) in &self.state.clients {
            out.push_str(&format!("\n# {} {name}\nuser {name}\n", c.kind.word()));
            for rule in rules(p, name, &c.kind) {
                out.push_str(&format!("topic {rule}\n"));
            }
        }
        out
    }
}

/// One client's rules as `ACCESS TOPIC` (Mosquitto's words: read, write, readwrite).
pub fn rules(p: &str, name: &str, kind: &Kind) -> Vec<String> {
    let mut r = Vec::new();
    match kind {
        Kind::Device { groups } => {
            // Its facts, each named: a device cannot write a command topic, its own included.
            for fact in ["meta", "status", "cfg", "state/#", "telemetry", "logs", "rejected", "op/#", "components/#"] {
                r.push(format!("write {p}/device/{name}/{fact}"));
            }
            r.push(format!("read {p}/device/{name}/cmd/#"));
            // Its remote sessions: it writes their output, reads their input.
            r.push(format!("write {p}/session/{name}/+/out"));
            r.push(format!("read {p}/session/{name}/+/in"));
            r.push(format!("read {p}/fleet/cmd/#"));
            r.push(format!("read {p}/desired/device/{name}"));
            for g in groups {
                r.push(format!("read {p}/group/{g}/cmd/#"));
                r.push(format!("read {p}/desired/group/{g}"));
            }
        }
        Kind::Console { role } => {
            r.push(format!("read {p}/#"));
            // A console's read marker and the fleet index (a hint for the next read: at worst a
            // wrong one makes a read wait its ten seconds).
            r.push(format!("write {p}/console/#"));
            r.push(format!("write {p}/index"));
            if *role >= Role::Operator {
                r.push(format!("write {p}/device/+/cmd/#"));
                r.push(format!("write {p}/group/+/cmd/#"));
                r.push(format!("write {p}/fleet/cmd/#"));
                r.push(format!("write {p}/session/+/+/in"));
            }
            if *role >= Role::Admin {
                r.push(format!("write {p}/desired/#"));
                r.push(format!("write {p}/rollout/#"));
            }
        }
    }
    r
}

impl Kind {
    fn word(&self) -> &'static str {
        match self {
            Kind::Device { .. } => "device",
            Kind::Console { .. } => "user",
        }
    }
}

fn check_user_name(name: &str) -> Result<()> {
    let ok =
        !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
    if !ok {
        bail!("user name {name:?}: 1-64 letters, digits, '-', '_', '.' or '@'");
    }
    Ok(())
}

/// Bytes from the system's random source (passwords, salts, keys).
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut raw = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
    Ok(raw)
}

pub fn random_password() -> Result<String> {
    let raw: [u8; 18] = random_bytes()?;
    Ok(base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, raw))
}

/// Mosquitto 2's `$7$ROUNDS$SALT$HASH`: PBKDF2-HMAC-SHA512 over a 12-byte salt, 64 bytes out,
/// both in standard base64.
pub fn mosquitto_hash(password: &str) -> Result<String> {
    let salt: [u8; 12] = random_bytes()?;
    Ok(hash_with(password, &salt))
}

fn hash_with(password: &str, salt: &[u8]) -> String {
    use base64::Engine;
    let mut out = [0u8; 64];
    let rounds = std::num::NonZeroU32::new(PBKDF2_ROUNDS).expect("not zero");
    ring::pbkdf2::derive(ring::pbkdf2::PBKDF2_HMAC_SHA512, rounds, salt, password.as_bytes(), &mut out);
    let b64 = base64::engine::general_purpose::STANDARD;
    format!("$7${PBKDF2_ROUNDS}${}${}", b64.encode(salt), b64.encode(out))
}

/// Whether `password` matches a `$7$` hash (for the embedded broker, which reads the same file).
pub fn verify(hash: &str, password: &str) -> bool {
    use base64::Engine;
    let mut parts = hash.split('$');
    let (Some(""), Some("7"), Some(rounds), Some(salt), Some(want), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let (Ok(rounds), Ok(salt), Ok(want)) = (rounds.parse::<u32>(), b64.decode(salt), b64.decode(want)) else {
        return false;
    };
    let Some(rounds) = std::num::NonZeroU32::new(rounds) else { return false };
    ring::pbkdf2::verify(ring::pbkdf2::PBKDF2_HMAC_SHA512, rounds, &salt, password.as_bytes(), &want).is_ok()
}

/// Reads a password file of `name:$7$...` lines into a map (for the embedded broker).
pub fn read_passwd(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.lines().filter_map(|l| l.split_once(':')).map(|(n, h)| (n.to_owned(), h.to_owned())).collect())
}

/// Written whole and renamed into place. `shared`: readable by the broker's group (0640, group
/// `mosquitto` when that group exists), else 0600.
pub fn write_private(path: &Path, bytes: &[u8], shared: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mode = if shared { 0o640 } else { 0o600 };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    if shared {
        if let Some(gid) = group_id("mosquitto") {
            use std::os::fd::AsRawFd;
            // SAFETY: fchown on a descriptor we own; -1 leaves the owner as it is.
            unsafe { libc::fchown(f.as_raw_fd(), u32::MAX, gid) };
        }
    }
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

fn group_id(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then(|| f.nth(1)?.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_match_mosquittos_format() {
        let h = hash_with("secret-password", b"0123456789ab");
        assert!(h.starts_with("$7$101$MDEyMzQ1Njc4OWFi$"), "{h}");
        assert_eq!(h.rsplit('$').next().unwrap().len(), 88, "64 bytes in base64");
        assert!(verify(&h, "secret-password"));
        assert!(!verify(&h, "secret-passwore"));
        assert!(!verify("$6$abc$def", "x"));
        assert!(!verify("", ""));
    }

    #[test]
    fn rules_per_kind() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = BrokerDir::init(dir.path(), "debfleet").unwrap();
        let pw = b.add_device("lab-1", &["lab".into()], false).unwrap().unwrap();
        assert!(pw.len() >= 20);
        b.add_user("ana", Role::Viewer, None).unwrap();
        b.add_user("ops", Role::Operator, Some("long enough password".into())).unwrap();
        assert!(b.add_user("lab-1", Role::Admin, None).is_err(), "one name space");
        assert!(b.add_device("Bad/Id", &[], false).is_err());
        assert!(b.add_user("short", Role::Viewer, Some("short".into())).is_err());
        let acl = b.acl();
        assert!(acl.contains("user lab-1\ntopic write debfleet/device/lab-1/meta\n"), "{acl}");
        assert!(!acl.contains("write debfleet/device/lab-1/cmd"), "{acl}");
        assert!(acl.contains("topic read debfleet/group/lab/cmd/#"));
        let ana = acl.split("\n# user ana\n").nth(1).unwrap().split("\n# ").next().unwrap();
        assert!(!ana.contains("cmd"), "{ana}");
        assert!(acl.contains("user ops\ntopic read debfleet/#"));
        let passwd = std::fs::read_to_string(b.passwd_path()).unwrap();
        assert_eq!(passwd.lines().count(), 3);
        let map = read_passwd(&b.passwd_path()).unwrap();
        assert!(verify(&map["lab-1"], &pw));
        assert!(verify(&map["ops"], "long enough password"));
        // Groups change, the password stays.
        assert_eq!(b.add_device("lab-1", &["edge".into()], true).unwrap(), None);
        assert!(verify(&read_passwd(&b.passwd_path()).unwrap()["lab-1"], &pw));
        assert!(b.acl().contains("read debfleet/group/edge/cmd/#") && !b.acl().contains("group/lab/"));
        // The state survives a reopen; removing takes the client out of both files.
        let mut b = BrokerDir::open(dir.path()).unwrap();
        b.remove("ana").unwrap();
        assert!(!std::fs::read_to_string(b.acl_path()).unwrap().contains("ana"));
        assert!(b.remove("ana").is_err());
        use std::os::unix::fs::PermissionsExt;
        let mode = |f: &str| std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode("broker.json"), mode("passwd"), mode("acl")), (0o600, 0o640, 0o640));
    }
}

/// `debfleet broker ...`
#[derive(clap::Subcommand)]
pub enum BrokerAction {
    /// Start a broker configuration in --dir (no clients yet).
    Init,
    /// Enroll a device (or change its groups): a password for it, and the agent configuration
    /// lines it needs. Mosquitto reads the files again on SIGHUP.
    AddDevice {
        /// The device id (as the agent's device_id).
        id: String,
        /// The groups whose commands and desired state it may read (comma-separated or
        /// repeated); when its groups change in its configuration, enroll it again with them.
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// Keep the device's password (only change its groups).
        #[arg(long)]
        keep_password: bool,
        /// Write the password to this file (mode 0600) instead of printing it.
        #[arg(long)]
        password_out: Option<PathBuf>,
    },
    /// Add a console user (or change their role): viewer reads everything, operator also
    /// commands devices, admin also sets desired state and drives rollouts.
    AddUser {
        /// The user name (letters, digits, '-', '_', '.', '@').
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: String,
        /// Read the password (one line, at least 12 characters) from stdin instead of making one.
        #[arg(long)]
        password_stdin: bool,
        /// Write the password to this file (mode 0600) instead of printing it.
        #[arg(long)]
        password_out: Option<PathBuf>,
    },
    /// Remove a device or a user.
    Remove {
        /// The device id or user name.
        name: String,
    },
    /// List devices and users.
    List,
    /// Print the lines a Mosquitto configuration needs (e.g. into /etc/mosquitto/conf.d/).
    Config,
}

pub fn run(dir: &Path, prefix: &str, action: BrokerAction) -> Result<u8> {
    match action {
        BrokerAction::Init => {
            let b = BrokerDir::init(dir, prefix)?;
            println!("broker configuration in {}; add devices and users, then put these lines in Mosquitto's configuration:\n", dir.display());
            print!("{}", b.mosquitto_lines());
        }
        BrokerAction::AddDevice { id, groups, keep_password, password_out } => {
            let mut b = BrokerDir::open(dir)?;
            let password = b.add_device(&id, &groups, keep_password)?;
            let file = "/etc/debfleet/broker-password";
            match (&password, &password_out) {
                (Some(p), Some(out)) => write_private(out, format!("{p}\n").as_bytes(), false)?,
                (Some(p), None) => println!("password for {id} (shown once): {p}\n"),
                (None, _) => println!("{id}: groups changed, password kept"),
            }
            if password.is_some() {
                println!(
                    "On the device, /etc/debfleet/agent.toml:\n  device_id = \"{id}\"\n  username = \"{id}\"\n  password_file = \"{file}\"\n\
                     and the password, one line, in {file} (mode 0600){}.",
                    password_out.as_ref().map(|p| format!(" — it is in {}", p.display())).unwrap_or_default()
                );
            }
            println!("Reload the broker: systemctl reload mosquitto (or kill -HUP its pid).");
        }
        BrokerAction::AddUser { name, role, password_stdin, password_out } => {
            let role = Role::parse(&role)
                .ok_or_else(|| crate::cmds::usage(format!("{role:?}: the roles are viewer, operator and admin")))?;
            let given = if password_stdin {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).context("reading the password from stdin")?;
                Some(line.trim_end_matches(['\n', '\r']).to_owned())
            } else {
                None
            };
            let mut b = BrokerDir::open(dir)?;
            let made = b.add_user(&name, role, given.clone())?;
            match (made, given, password_out) {
                (Some(p), None, Some(out)) => write_private(&out, format!("{p}\n").as_bytes(), false)?,
                (Some(p), None, None) => println!("password for {name} (shown once): {p}"),
                _ => {}
            }
            println!(
                "{name} is a broker {} now; the console connects as it with --broker-user {name} and \
                 --broker-password-file FILE (or DEBFLEET_BROKER_PASSWORD). Reload the broker.",
                role.as_str()
            );
        }
        BrokerAction::Remove { name } => {
            BrokerDir::open(dir)?.remove(&name)?;
            println!("removed {name}; reload the broker (a connected client keeps its connection until then)");
        }
        BrokerAction::List => {
            for (name, kind) in BrokerDir::open(dir)?.list() {
                match kind {
                    Kind::Device { groups } => println!("{name}\tdevice\tgroups {}", groups.join(",")),
                    Kind::Console { role } => println!("{name}\t{}", role.as_str()),
                }
            }
        }
        BrokerAction::Config => print!("{}", BrokerDir::open(dir)?.mosquitto_lines()),
    }
    Ok(0)
}
