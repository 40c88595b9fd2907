//! Commands as they arrive on `.../cmd/VERB`: size check, JSON, id, verb, arguments. Parsing is
//! total: any byte string yields either a command or a rejection with an error code.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::ids::{ActionName, ComponentId, OpId};
use crate::limits::MAX_COMMAND_BYTES;
use crate::payloads::ErrorCode;

/// The verbs this contract version defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Ping,
    Refresh,
    Restart,
    Cfg,
    Clear,
    Install,
    Upgrade,
    Uninstall,
    Rollback,
    Call,
    Journal,
    Shell,
    Forward,
}

impl Verb {
    pub const ALL: [Verb; 13] = [
        Verb::Ping,
        Verb::Refresh,
        Verb::Restart,
        Verb::Cfg,
        Verb::Clear,
        Verb::Install,
        Verb::Upgrade,
        Verb::Uninstall,
        Verb::Rollback,
        Verb::Call,
        Verb::Journal,
        Verb::Shell,
        Verb::Forward,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Ping => "ping",
            Verb::Refresh => "refresh",
            Verb::Restart => "restart",
            Verb::Cfg => "cfg",
            Verb::Clear => "clear",
            Verb::Install => "install",
            Verb::Upgrade => "upgrade",
            Verb::Uninstall => "uninstall",
            Verb::Rollback => "rollback",
            Verb::Call => "call",
            Verb::Journal => "journal",
            Verb::Shell => "shell",
            Verb::Forward => "forward",
        }
    }

    pub fn from_name(name: &str) -> Option<Verb> {
        Verb::ALL.into_iter().find(|v| v.as_str() == name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum CommandArgs {
    Ping,
    Refresh,
    /// Restart the agent itself, or a managed unit when `unit` is given.
    Restart {
        unit: Option<String>,
    },
    /// A partial configuration update (see [`crate::RuntimeCfg::apply_patch`]).
    Cfg {
        set: Value,
    },
    /// Forget finished operations: the listed ids, or those finished more than `older_than_s`
    /// seconds ago, or all finished ones when neither is given.
    Clear {
        ops: Vec<OpId>,
        older_than_s: Option<u64>,
    },
    /// Install packages (`name` or `name=version`).
    Install {
        packages: Vec<PackageSpec>,
        options: PackageOptions,
    },
    /// Upgrade packages to the given or the newest versions; all managed packages when empty.
    Upgrade {
        packages: Vec<PackageSpec>,
        options: PackageOptions,
    },
    Uninstall {
        packages: Vec<PackageSpec>,
        purge: bool,
        options: PackageOptions,
    },
    /// Back to `version`, or to the version installed before the current one.
    Rollback {
        package: PackageSpec,
        options: PackageOptions,
    },
    /// Read the journal of the managed packages' units (or of `unit`): the newest `lines`
    /// entries, from the last `since_s` seconds when given. With `follow` (the console's
    /// session key), a session (see `session.rs`) then streams new entries until it ends.
    Journal {
        unit: Option<String>,
        since_s: Option<u64>,
        lines: u32,
        follow: Option<[u8; 32]>,
    },
    /// Open a remote terminal (see `session.rs`): the console's session key, its terminal's
    /// size and type, and a command to run instead of a login shell. `raw` turns the device's
    /// line discipline off (a command's output arrives byte for byte; for scripts).
    Shell {
        key: [u8; 32],
        cols: u16,
        rows: u16,
        term: String,
        command: Option<String>,
        raw: bool,
    },
    /// Forward TCP connections to `to` (`HOST:PORT`, which the device's agent.toml must allow).
    Forward {
        key: [u8; 32],
        to: String,
    },
    /// One action of a component; its arguments are checked by the component against the
    /// action's parameters.
    Call {
        component: ComponentId,
        action: ActionName,
        args: Map<String, Value>,
    },
}

/// A package name with an optional version, checked against Debian policy syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageSpec {
    pub name: String,
    pub version: Option<String>,
}

impl PackageSpec {
    pub fn parse(s: &str) -> Result<PackageSpec, String> {
        let (name, version) = match s.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (s, None),
        };
        if !crate::debian::valid_package_name(name) {
            return Err(format!("{name:?} is not a Debian package name"));
        }
        if let Some(v) = version {
            if !crate::debian::valid_version(v) {
                return Err(format!("{v:?} is not a Debian version"));
            }
        }
        Ok(PackageSpec { name: name.to_owned(), version: version.map(str::to_owned) })
    }
}

impl std::fmt::Display for PackageSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.version {
            Some(v) => write!(f, "{}={v}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackageOptions {
    /// Report what would change; change nothing.
    pub dry_run: bool,
    /// Seconds to watch the packages' units after the change before calling it good
    /// (default: the agent's setting).
    pub watch_s: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub id: OpId,
    pub verb: Verb,
    pub args: CommandArgs,
    /// `expires_at` (unix milliseconds): a device that gets the command later does not run it.
    pub expires_at: Option<i64>,
    /// Who asked (an operator's name): the device keeps it in the operation's record.
    pub by: Option<String>,
    /// An operator's signature (`sig`), checked by devices that require one.
    pub signature: Option<crate::signature::Signature>,
}

/// Why a command was not accepted. With an `id` the failure is reported on that operation's
/// topic; without one, on the device's `rejected` topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub id: Option<OpId>,
    pub code: ErrorCode,
    pub message: String,
}

fn reject(id: Option<OpId>, code: ErrorCode, message: impl Into<String>) -> Rejection {
    Rejection { id, code, message: message.into() }
}

/// At most this many journal entries per `journal` command (the record must fit its topic).
pub const MAX_JOURNAL_LINES: u32 = 1000;
pub const DEFAULT_JOURNAL_LINES: u32 = 100;

#[derive(Deserialize)]
struct JournalArgs {
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    since_s: Option<u64>,
    #[serde(default)]
    lines: Option<u32>,
    #[serde(default)]
    follow: bool,
    #[serde(default)]
    key: Option<String>,
}

#[derive(Deserialize)]
struct ShellArgs {
    key: String,
    #[serde(default)]
    cols: Option<u16>,
    #[serde(default)]
    rows: Option<u16>,
    #[serde(default)]
    term: Option<String>,
    #[serde(default)]
    command: Option<String>,
    #[serde(default)]
    raw: bool,
}

#[derive(Deserialize)]
struct ForwardArgs {
    key: String,
    to: String,
}

/// A session key: 64 hex digits (an X25519 public key).
fn session_key(s: &str) -> Result<[u8; 32], String> {
    crate::signature::from_hex::<32>(s).ok_or_else(|| "key: expected 64 hex digits".to_owned())
}

/// The longest command a `shell` may carry.
pub const MAX_SHELL_COMMAND_BYTES: usize = 4096;

#[derive(Deserialize)]
struct RestartArgs {
    #[serde(default)]
    unit: Option<String>,
}

#[derive(Deserialize)]
struct CfgArgs {
    set: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PackageArgs {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    v: Option<Value>,
    #[serde(default)]
    expires_at: Option<Value>,
    #[serde(default)]
    by: Option<Value>,
    #[serde(default)]
    sig: Option<Value>,
    #[serde(default)]
    packages: Vec<String>,
    #[serde(default)]
    package: Option<String>,
    #[serde(default)]
    purge: bool,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    watch_s: Option<u32>,
}

fn specs(list: &[String]) -> Result<Vec<PackageSpec>, String> {
    if list.len() > 64 {
        return Err("at most 64 packages per operation".into());
    }
    list.iter().map(|s| PackageSpec::parse(s)).collect()
}

/// The arguments every package verb shares, checked.
struct PackageWords {
    packages: Vec<PackageSpec>,
    purge: bool,
    options: PackageOptions,
}

fn package_words(v: Value) -> Result<PackageWords, String> {
    let a: PackageArgs = serde_json::from_value(v).map_err(|e| e.to_string())?;
    let _ = (a.id, a.v, a.expires_at, a.by, a.sig);
    if a.watch_s.is_some_and(|w| w > 3600) {
        return Err("watch_s must be at most 3600".into());
    }
    let options = PackageOptions { dry_run: a.dry_run, watch_s: a.watch_s };
    let mut packages = specs(&a.packages)?;
    if let Some(p) = &a.package {
        packages.push(PackageSpec::parse(p)?);
    }
    Ok(PackageWords { packages, purge: a.purge, options })
}

#[derive(Deserialize)]
struct CallArgs {
    component: ComponentId,
    action: ActionName,
    #[serde(default)]
    args: Map<String, Value>,
}

#[derive(Deserialize)]
struct ClearArgs {
    #[serde(default)]
    ops: Vec<OpId>,
    #[serde(default)]
    older_than_s: Option<u64>,
}

pub fn parse_command(verb: &str, payload: &[u8]) -> Result<Command, Rejection> {
    if payload.len() > MAX_COMMAND_BYTES {
        return Err(reject(
            None,
            ErrorCode::PayloadTooLarge,
            format!("command is {} bytes; the limit is {MAX_COMMAND_BYTES}", payload.len()),
        ));
    }
    let object: Map<String, Value> = match serde_json::from_slice(payload) {
        Ok(Value::Object(o)) => o,
        Ok(other) => {
            return Err(reject(
                None,
                ErrorCode::MalformedJson,
                format!("expected a JSON object, got {}", type_name(&other)),
            ))
        }
        Err(e) => return Err(reject(None, ErrorCode::MalformedJson, format!("not JSON: {e}"))),
    };
    let id = match object.get("id") {
        Some(Value::String(s)) if s.starts_with(crate::desired::OP_PREFIX) => {
            return Err(reject(
                None,
                ErrorCode::InvalidId,
                format!("ids starting with {:?} are the device's own (desired state)", crate::desired::OP_PREFIX),
            ))
        }
        Some(Value::String(s)) => {
            OpId::new(s.as_str()).map_err(|e| reject(None, ErrorCode::InvalidId, e.to_string()))?
        }
        Some(other) => {
            return Err(reject(None, ErrorCode::InvalidId, format!("id must be a string, got {}", type_name(other))))
        }
        None => return Err(reject(None, ErrorCode::MissingId, "the command has no \"id\"")),
    };
    let expires_at = match object.get("expires_at") {
        None => None,
        Some(Value::String(s)) => Some(crate::time::parse_unix_ms(s).ok_or_else(|| {
            reject(Some(id.clone()), ErrorCode::InvalidValue, format!("expires_at: {s:?} is not an RFC 3339 time"))
        })?),
        Some(other) => {
            return Err(reject(
                Some(id),
                ErrorCode::InvalidValue,
                format!("expires_at must be an RFC 3339 time string, got {}", type_name(other)),
            ))
        }
    };
    let by = match object.get("by") {
        None => None,
        Some(Value::String(s)) => {
            crate::ids::check_by(s).map_err(|e| reject(Some(id.clone()), ErrorCode::InvalidValue, e))?;
            Some(s.clone())
        }
        Some(other) => {
            return Err(reject(
                Some(id),
                ErrorCode::InvalidValue,
                format!("by must be a string, got {}", type_name(other)),
            ))
        }
    };
    let signature = match object.get("sig") {
        None => None,
        Some(v) => Some(
            parse_signature(v).map_err(|e| reject(Some(id.clone()), ErrorCode::InvalidValue, format!("sig: {e}")))?,
        ),
    };
    let Some(verb) = Verb::from_name(verb) else {
        return Err(reject(Some(id), ErrorCode::UnknownVerb, format!("unknown verb {verb:?}")));
    };
    let args = parse_args(verb, Value::Object(object))
        .map_err(|e| reject(Some(id.clone()), ErrorCode::InvalidValue, format!("{}: {e}", verb.as_str())))?;
    Ok(Command { id, verb, args, expires_at, by, signature })
}

/// `{"key": NAME, "issued_at": RFC 3339, "value": 128 hex digits}`.
fn parse_signature(v: &Value) -> Result<crate::signature::Signature, String> {
    let Value::Object(o) = v else { return Err(format!("expected an object, got {}", type_name(v))) };
    let text = |k: &str| match o.get(k) {
        Some(Value::String(s)) => Ok(s.as_str()),
        Some(other) => Err(format!("{k} must be a string, got {}", type_name(other))),
        None => Err(format!("no {k}")),
    };
    let key = text("key")?;
    if !crate::signature::valid_key_name(key) {
        return Err(format!("key {key:?}: 1-64 letters, digits, '-', '_', '.' or '@'"));
    }
    let at = text("issued_at")?;
    let issued_at =
        crate::time::parse_unix_ms(at).ok_or_else(|| format!("issued_at: {at:?} is not an RFC 3339 time"))?;
    let value = crate::signature::from_hex::<64>(text("value")?).ok_or("value: expected 128 hex digits")?;
    Ok(crate::signature::Signature { key: key.to_owned(), issued_at, value })
}

fn parse_args(verb: Verb, v: Value) -> Result<CommandArgs, String> {
    let de = |e: serde_json::Error| e.to_string();
    Ok(match verb {
        Verb::Ping => CommandArgs::Ping,
        Verb::Refresh => CommandArgs::Refresh,
        Verb::Restart => CommandArgs::Restart { unit: serde_json::from_value::<RestartArgs>(v).map_err(de)?.unit },
        Verb::Cfg => CommandArgs::Cfg { set: Value::Object(serde_json::from_value::<CfgArgs>(v).map_err(de)?.set) },
        Verb::Clear => {
            let a: ClearArgs = serde_json::from_value(v).map_err(de)?;
            CommandArgs::Clear { ops: a.ops, older_than_s: a.older_than_s }
        }
        Verb::Install => {
            let w = package_words(v)?;
            if w.packages.is_empty() {
                return Err("packages: name at least one package".into());
            }
            CommandArgs::Install { packages: w.packages, options: w.options }
        }
        Verb::Upgrade => {
            let w = package_words(v)?;
            CommandArgs::Upgrade { packages: w.packages, options: w.options }
        }
        Verb::Uninstall => {
            let w = package_words(v)?;
            if w.packages.is_empty() {
                return Err("packages: name at least one package".into());
            }
            if w.packages.iter().any(|p| p.version.is_some()) {
                return Err("uninstall takes package names without versions".into());
            }
            CommandArgs::Uninstall { packages: w.packages, purge: w.purge, options: w.options }
        }
        Verb::Call => {
            let a: CallArgs = serde_json::from_value(v).map_err(de)?;
            CommandArgs::Call { component: a.component, action: a.action, args: a.args }
        }
        Verb::Journal => {
            let a: JournalArgs = serde_json::from_value(v).map_err(de)?;
            if let Some(u) = a.unit.as_deref().filter(|u| !crate::units::valid_unit_name(u)) {
                return Err(format!("unit {u:?} is not a systemd unit name"));
            }
            let lines = a.lines.unwrap_or(DEFAULT_JOURNAL_LINES);
            if lines == 0 || lines > MAX_JOURNAL_LINES {
                return Err(format!("lines must be 1 to {MAX_JOURNAL_LINES}"));
            }
            if a.since_s.is_some_and(|s| s == 0 || s > 366 * 86_400) {
                return Err("since_s must be 1 to a year of seconds".into());
            }
            let follow = match (a.follow, a.key.as_deref()) {
                (true, Some(k)) => Some(session_key(k)?),
                (true, None) => return Err("follow needs the session's key".into()),
                (false, Some(_)) => return Err("key goes with follow".into()),
                (false, None) => None,
            };
            CommandArgs::Journal { unit: a.unit, since_s: a.since_s, lines, follow }
        }
        Verb::Shell => {
            let a: ShellArgs = serde_json::from_value(v).map_err(de)?;
            let key = session_key(&a.key)?;
            let term = a.term.unwrap_or_else(|| "xterm-256color".into());
            if term.is_empty()
                || term.len() > 64
                || !term.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_.+".contains(&c))
            {
                return Err(format!("term {term:?}: 1-64 letters, digits, '-', '_', '.', '+'"));
            }
            if let Some(c) = &a.command {
                if c.is_empty() || c.len() > MAX_SHELL_COMMAND_BYTES || c.contains('\0') {
                    return Err(format!("command: 1 to {MAX_SHELL_COMMAND_BYTES} bytes, no NUL"));
                }
            }
            let (cols, rows) = (a.cols.unwrap_or(80), a.rows.unwrap_or(24));
            if cols == 0 || rows == 0 {
                return Err("cols and rows must be at least 1".into());
            }
            CommandArgs::Shell { key, cols, rows, term, command: a.command, raw: a.raw }
        }
        Verb::Forward => {
            let a: ForwardArgs = serde_json::from_value(v).map_err(de)?;
            let key = session_key(&a.key)?;
            if !crate::session::valid_forward_target(&a.to) {
                return Err(format!("to {:?}: expected HOST:PORT", a.to));
            }
            CommandArgs::Forward { key, to: a.to }
        }
        Verb::Rollback => {
            let mut w = package_words(v)?;
            match (w.packages.pop(), w.packages.is_empty()) {
                (Some(package), true) => CommandArgs::Rollback { package, options: w.options },
                _ => return Err("rollback takes exactly one package".into()),
            }
        }
    })
}

impl CommandArgs {
    pub fn verb(&self) -> Verb {
        match self {
            CommandArgs::Ping => Verb::Ping,
            CommandArgs::Refresh => Verb::Refresh,
            CommandArgs::Restart { .. } => Verb::Restart,
            CommandArgs::Cfg { .. } => Verb::Cfg,
            CommandArgs::Clear { .. } => Verb::Clear,
            CommandArgs::Install { .. } => Verb::Install,
            CommandArgs::Upgrade { .. } => Verb::Upgrade,
            CommandArgs::Uninstall { .. } => Verb::Uninstall,
            CommandArgs::Rollback { .. } => Verb::Rollback,
            CommandArgs::Call { .. } => Verb::Call,
            CommandArgs::Journal { .. } => Verb::Journal,
            CommandArgs::Shell { .. } => Verb::Shell,
            CommandArgs::Forward { .. } => Verb::Forward,
        }
    }

    /// The command as it goes on the wire (`.../cmd/VERB` with this payload): exactly what
    /// [`parse_command`] reads back as the same arguments, so sender and receiver cannot
    /// disagree.
    pub fn to_payload(&self, id: &OpId) -> Vec<u8> {
        self.payload(id, None, None)
    }

    /// The payload with the envelope's optional fields: an expiry (unix milliseconds; devices
    /// that get it later refuse it) and who asked.
    fn payload(&self, id: &OpId, expires_at: Option<i64>, by: Option<&str>) -> Vec<u8> {
        let mut m = Map::new();
        m.insert("id".into(), Value::String(id.to_string()));
        if let Some(t) = expires_at {
            m.insert("expires_at".into(), Value::String(crate::time::format_unix_ms(t)));
        }
        if let Some(by) = by {
            m.insert("by".into(), Value::String(by.to_owned()));
        }
        let specs = |p: &[PackageSpec]| Value::Array(p.iter().map(|s| Value::String(s.to_string())).collect());
        let put_options = |m: &mut Map<String, Value>, o: &PackageOptions| {
            if o.dry_run {
                m.insert("dry_run".into(), Value::Bool(true));
            }
            if let Some(w) = o.watch_s {
                m.insert("watch_s".into(), w.into());
            }
        };
        match self {
            CommandArgs::Ping | CommandArgs::Refresh => {}
            CommandArgs::Restart { unit } => {
                if let Some(u) = unit {
                    m.insert("unit".into(), Value::String(u.clone()));
                }
            }
            CommandArgs::Cfg { set } => {
                m.insert("set".into(), set.clone());
            }
            CommandArgs::Clear { ops, older_than_s } => {
                if !ops.is_empty() {
                    m.insert("ops".into(), Value::Array(ops.iter().map(|o| Value::String(o.to_string())).collect()));
                }
                if let Some(s) = older_than_s {
                    m.insert("older_than_s".into(), (*s).into());
                }
            }
            CommandArgs::Install { packages, options } | CommandArgs::Upgrade { packages, options } => {
                m.insert("packages".into(), specs(packages));
                put_options(&mut m, options);
            }
            CommandArgs::Uninstall { packages, purge, options } => {
                m.insert("packages".into(), specs(packages));
                if *purge {
                    m.insert("purge".into(), Value::Bool(true));
                }
                put_options(&mut m, options);
            }
            CommandArgs::Rollback { package, options } => {
                m.insert("package".into(), Value::String(package.to_string()));
                put_options(&mut m, options);
            }
            CommandArgs::Journal { unit, since_s, lines, follow } => {
                if let Some(key) = follow {
                    m.insert("follow".into(), Value::Bool(true));
                    m.insert("key".into(), Value::String(crate::signature::to_hex(key)));
                }
                if let Some(u) = unit {
                    m.insert("unit".into(), Value::String(u.clone()));
                }
                if let Some(s) = since_s {
                    m.insert("since_s".into(), (*s).into());
                }
                m.insert("lines".into(), (*lines).into());
            }
            CommandArgs::Shell { key, cols, rows, term, command, raw } => {
                m.insert("key".into(), Value::String(crate::signature::to_hex(key)));
                m.insert("cols".into(), (*cols).into());
                m.insert("rows".into(), (*rows).into());
                m.insert("term".into(), Value::String(term.clone()));
                if let Some(c) = command {
                    m.insert("command".into(), Value::String(c.clone()));
                }
                if *raw {
                    m.insert("raw".into(), Value::Bool(true));
                }
            }
            CommandArgs::Forward { key, to } => {
                m.insert("key".into(), Value::String(crate::signature::to_hex(key)));
                m.insert("to".into(), Value::String(to.clone()));
            }
            CommandArgs::Call { component, action, args } => {
                m.insert("component".into(), Value::String(component.to_string()));
                m.insert("action".into(), Value::String(action.to_string()));
                m.insert("args".into(), Value::Object(args.clone()));
            }
        }
        // A map of strings, numbers and booleans always serialises.
        serde_json::to_vec(&Value::Object(m)).unwrap_or_default()
    }
}

impl Command {
    /// The payload as it goes on the wire, with the signature when there is one.
    pub fn to_payload(&self) -> Vec<u8> {
        let canonical = self.canonical_payload();
        let Some(sig) = &self.signature else { return canonical };
        let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(&canonical) else { return canonical };
        m.insert(
            "sig".into(),
            serde_json::json!({
                "key": sig.key,
                "issued_at": crate::time::format_unix_ms(sig.issued_at),
                "value": crate::signature::to_hex(&sig.value),
            }),
        );
        serde_json::to_vec(&Value::Object(m)).unwrap_or(canonical)
    }

    /// The payload without its signature, rebuilt from the typed command (keys sorted): what a
    /// signature covers (see `signature.rs`).
    pub fn canonical_payload(&self) -> Vec<u8> {
        self.args.payload(&self.id, self.expires_at, self.by.as_deref())
    }

    /// The bytes `key` signs (at `issued_at`) for this command sent to `target`.
    pub fn signed_message(&self, key: &str, target: &crate::signature::SignTarget, issued_at: i64) -> Vec<u8> {
        crate::signature::message(key, target, self.verb.as_str(), issued_at, &self.canonical_payload())
    }

    /// Whether the command's expiry has passed at `now_ms`.
    pub fn expired(&self, now_ms: i64) -> bool {
        self.expires_at.is_some_and(|t| now_ms >= t)
    }
}

/// How a JSON value is named in error messages ("got a string").
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn code(verb: &str, payload: &[u8]) -> ErrorCode {
        parse_command(verb, payload).unwrap_err().code
    }

    #[test]
    fn parses_known_verbs() {
        let c = parse_command("ping", br#"{"id":"p1","extra":true}"#).unwrap();
        assert_eq!((c.id.as_str(), c.verb, c.args), ("p1", Verb::Ping, CommandArgs::Ping));
        let c = parse_command("cfg", br#"{"id":"c1","set":{"logs":{"level":"debug"}}}"#).unwrap();
        assert!(matches!(c.args, CommandArgs::Cfg { .. }));
        let c = parse_command("install", br#"{"id":"i1","packages":["hello=2.10-3","world"],"watch_s":5}"#).unwrap();
        let CommandArgs::Install { packages, options } = c.args else { panic!("not an install") };
        assert_eq!(packages[0], PackageSpec { name: "hello".into(), version: Some("2.10-3".into()) });
        assert_eq!(options.watch_s, Some(5));
        let c = parse_command("rollback", br#"{"id":"r1","package":"hello"}"#).unwrap();
        assert!(matches!(c.args, CommandArgs::Rollback { .. }));
        let c = parse_command("upgrade", br#"{"id":"u1"}"#).unwrap();
        assert!(matches!(c.args, CommandArgs::Upgrade { ref packages, .. } if packages.is_empty()));
        let c = parse_command("clear", br#"{"id":"c2","older_than_s":60}"#).unwrap();
        assert_eq!(c.args, CommandArgs::Clear { ops: vec![], older_than_s: Some(60) });
    }

    /// The inputs bench/fuzz.sh found crashing the command target (2026-12-04): expiry times
    /// whose year overflowed the time arithmetic. Each is a clear `invalid_value` now.
    #[test]
    fn fuzz_regressions_command_expiry() {
        for payload in [
            r#"{"id":"inskall-1795440000123-0a1b","packages":["led-strip","hello=U.10-3"],"expires_at":"207954400026-01-23T13:25:00.000Z"}"#,
            r#"{"id":"n7K5440000123-0a1b","pAck":["p","hell"],"expires_at":"20246666666666-01-23T13:25:00.000Z"}"#,
            r#"{"id":"n40000123-0a1b","pack":["p","hell"],"expires_at":"2026666666666666-01-23T13:25:00.000Z"}"#,
            r#"{"id":"n7K5440000123-0a1b","pank":["p","hell"],"expires_at":"2026666666666666666-01-23T13:25:00.000Z"}"#,
            r#"{"id":"G785440000123-0a1b","packages":[6,"pa-."],"expires_at":"402785440006-01-23T03:22:00.000Z"}"#,
            r#"{"id":"inskallG1795441000123-0a1b","pack":["led-strip","0-S"],"expires_at":"3026-01-23T13:25:-0222222222222229000Z"}"#,
        ] {
            let r = parse_command("install", payload.as_bytes()).unwrap_err();
            assert_eq!(r.code, ErrorCode::InvalidValue, "{payload}: {}", r.message);
            assert!(r.message.contains("expires_at"), "{payload}: {}", r.message);
        }
    }

    #[test]
    fn journal_arguments_are_bounded() {
        let c = parse_command("journal", br#"{"id":"j1"}"#).unwrap();
        assert_eq!(
            c.args,
            CommandArgs::Journal { unit: None, since_s: None, lines: DEFAULT_JOURNAL_LINES, follow: None }
        );
        let key = "cd".repeat(32);
        let c = parse_command("journal", format!(r#"{{"id":"j1","follow":true,"key":"{key}"}}"#).as_bytes()).unwrap();
        assert!(matches!(c.args, CommandArgs::Journal { follow: Some(k), .. } if k == [0xcd; 32]));
        for bad in [r#"{"id":"j1","follow":true}"#.to_owned(), format!(r#"{{"id":"j1","key":"{key}"}}"#)] {
            assert_eq!(code("journal", bad.as_bytes()), ErrorCode::InvalidValue, "{bad}");
        }
        for bad in [
            r#"{"id":"j1","lines":0}"#,
            r#"{"id":"j1","lines":100000}"#,
            r#"{"id":"j1","since_s":0}"#,
            r#"{"id":"j1","unit":"--all"}"#,
            r#"{"id":"j1","unit":"x; rm -rf /"}"#,
            r#"{"id":"j1","unit":"nounitsuffix"}"#,
        ] {
            assert_eq!(code("journal", bad.as_bytes()), ErrorCode::InvalidValue, "{bad}");
        }
    }

    #[test]
    fn session_arguments_are_checked() {
        let key = "ab".repeat(32);
        let c = parse_command("shell", format!(r#"{{"id":"s1","key":"{key}"}}"#).as_bytes()).unwrap();
        assert!(
            matches!(c.args, CommandArgs::Shell { cols: 80, rows: 24, ref term, command: None, raw: false, .. } if term == "xterm-256color")
        );
        for bad in [
            r#"{"id":"s1"}"#.to_owned(),
            r#"{"id":"s1","key":"abcd"}"#.to_owned(),
            format!(r#"{{"id":"s1","key":"{key}","cols":0}}"#),
            format!(r#"{{"id":"s1","key":"{key}","term":"xterm; rm"}}"#),
            format!(r#"{{"id":"s1","key":"{key}","command":""}}"#),
            format!(r#"{{"id":"s1","key":"{key}","command":"{}"}}"#, "x".repeat(MAX_SHELL_COMMAND_BYTES + 1)),
        ] {
            assert_eq!(code("shell", bad.as_bytes()), ErrorCode::InvalidValue, "{bad}");
        }
        for bad in [
            format!(r#"{{"id":"f1","key":"{key}"}}"#),
            format!(r#"{{"id":"f1","key":"{key}","to":"127.0.0.1"}}"#),
            format!(r#"{{"id":"f1","key":"{key}","to":"a/b:80"}}"#),
        ] {
            assert_eq!(code("forward", bad.as_bytes()), ErrorCode::InvalidValue, "{bad}");
        }
    }

    #[test]
    fn bad_input_matrix() {
        assert_eq!(code("ping", b"{not json"), ErrorCode::MalformedJson);
        assert_eq!(code("ping", b"[1,2]"), ErrorCode::MalformedJson);
        assert_eq!(code("ping", b"{}"), ErrorCode::MissingId);
        assert_eq!(code("ping", br#"{"id":7}"#), ErrorCode::InvalidId);
        assert_eq!(code("ping", br#"{"id":"../etc"}"#), ErrorCode::InvalidId);
        assert_eq!(code("install", br#"{"id":"desired-3","packages":["hello"]}"#), ErrorCode::InvalidId);
        assert_eq!(code("ping", &vec![b' '; MAX_COMMAND_BYTES + 1]), ErrorCode::PayloadTooLarge);
        let r = parse_command("launch", br#"{"id":"x1"}"#).unwrap_err();
        assert_eq!((r.code, r.id.unwrap().as_str()), (ErrorCode::UnknownVerb, "x1"));
        assert_eq!(code("cfg", br#"{"id":"x2"}"#), ErrorCode::InvalidValue);
        assert_eq!(code("clear", br#"{"id":"x3","ops":["a/b"]}"#), ErrorCode::InvalidValue);
        for bad in [
            r#"{"id":"p1","packages":["Bad Name"]}"#,
            r#"{"id":"p1","packages":["x; rm -rf /"]}"#,
            r#"{"id":"p1","packages":["hello=1 2"]}"#,
            r#"{"id":"p1","packages":["--purge"]}"#,
            r#"{"id":"p1","packages":[]}"#,
            r#"{"id":"p1","packages":"hello"}"#,
            r#"{"id":"p1","packages":["hello"],"watch_s":99999}"#,
            r#"{"id":"p1","packages":["hello"],"unknown":1}"#,
        ] {
            assert_eq!(code("install", bad.as_bytes()), ErrorCode::InvalidValue, "{bad}");
        }
        assert_eq!(code("uninstall", br#"{"id":"u","packages":["hello=1.0"]}"#), ErrorCode::InvalidValue);
        assert_eq!(code("rollback", br#"{"id":"r","packages":["a","b"]}"#), ErrorCode::InvalidValue);
        for bad in [
            r#"{"id":"c","action":"clear"}"#,
            r#"{"id":"c","component":"led-strip"}"#,
            r#"{"id":"c","component":"../x","action":"clear"}"#,
            r#"{"id":"c","component":"led-strip","action":"Clear"}"#,
            r#"{"id":"c","component":"led-strip","action":"clear","args":[1]}"#,
        ] {
            assert_eq!(code("call", bad.as_bytes()), ErrorCode::InvalidValue, "{bad}");
        }
    }

    #[test]
    fn every_command_round_trips_through_its_payload() {
        let spec = |s: &str| PackageSpec::parse(s).unwrap();
        let opts = PackageOptions { dry_run: true, watch_s: Some(7) };
        let cases = [
            CommandArgs::Ping,
            CommandArgs::Refresh,
            CommandArgs::Restart { unit: None },
            CommandArgs::Restart { unit: Some("demo-app.service".into()) },
            CommandArgs::Journal { unit: None, since_s: None, lines: 100, follow: None },
            CommandArgs::Journal { unit: Some("demo-app.service".into()), since_s: Some(600), lines: 20, follow: None },
            CommandArgs::Journal { unit: None, since_s: None, lines: 10, follow: Some([3; 32]) },
            CommandArgs::Shell { key: [7; 32], cols: 80, rows: 24, term: "xterm".into(), command: None, raw: false },
            CommandArgs::Shell {
                key: [0; 32],
                cols: 200,
                rows: 50,
                term: "xterm-256color".into(),
                command: Some("echo 'hi there'; exit 3".into()),
                raw: true,
            },
            CommandArgs::Forward { key: [9; 32], to: "127.0.0.1:80".into() },
            CommandArgs::Cfg { set: serde_json::json!({"logs": {"level": "debug"}}) },
            CommandArgs::Clear { ops: vec![OpId::new("p-1").unwrap()], older_than_s: Some(60) },
            CommandArgs::Clear { ops: vec![], older_than_s: None },
            CommandArgs::Install { packages: vec![spec("hello=2.10-3"), spec("world")], options: opts.clone() },
            CommandArgs::Upgrade { packages: vec![], options: PackageOptions::default() },
            CommandArgs::Uninstall { packages: vec![spec("hello")], purge: true, options: PackageOptions::default() },
            CommandArgs::Rollback { package: spec("hello=1:1.0~rc1"), options: opts },
            CommandArgs::Call {
                component: "led-strip".parse().unwrap(),
                action: "set-color".parse().unwrap(),
                args: serde_json::json!({"color": "#ff0000"}).as_object().unwrap().clone(),
            },
        ];
        let id = OpId::new("op-1").unwrap();
        for args in cases {
            let payload = args.to_payload(&id);
            let back = parse_command(args.verb().as_str(), &payload)
                .unwrap_or_else(|e| panic!("{args:?}: {} ({})", e.message, String::from_utf8_lossy(&payload)));
            assert_eq!((back.id, back.verb, back.args, back.expires_at), (id.clone(), args.verb(), args.clone(), None));
            let cmd = Command {
                id: id.clone(),
                verb: args.verb(),
                args: args.clone(),
                expires_at: Some(1_800_000_000_123),
                by: Some("ana lópez".into()),
                signature: None,
            };
            let back = parse_command(args.verb().as_str(), &cmd.to_payload()).unwrap();
            assert_eq!(back, cmd);
            assert!(back.expired(1_800_000_000_123) && !back.expired(1_800_000_000_122));
            // Signed: the signature travels, and the canonical payload the device rebuilds is
            // the one the sender signed.
            let signed = Command {
                signature: Some(crate::signature::Signature {
                    key: "ana".into(),
                    issued_at: 1_700_000_000_000,
                    value: [7; 64],
                }),
                ..cmd.clone()
            };
            let back = parse_command(args.verb().as_str(), &signed.to_payload()).unwrap();
            assert_eq!(back, signed);
            assert_eq!(back.canonical_payload(), cmd.to_payload());
        }
        for bad in [
            r#"{"id":"s1","sig":"x"}"#,
            r#"{"id":"s1","sig":{"key":"ana","issued_at":"2026-01-01T00:00:00Z"}}"#,
            r#"{"id":"s1","sig":{"key":"../a","issued_at":"2026-01-01T00:00:00Z","value":"00"}}"#,
            r#"{"id":"s1","sig":{"key":"ana","issued_at":"soon","value":"00"}}"#,
            r#"{"id":"s1","sig":{"key":"ana","issued_at":"2026-01-01T00:00:00Z","value":"00"}}"#,
        ] {
            let r = parse_command("install", bad.as_bytes()).unwrap_err();
            assert_eq!((r.code, r.id.map(|i| i.to_string())), (ErrorCode::InvalidValue, Some("s1".into())), "{bad}");
            assert!(r.message.contains("sig"), "{bad}: {}", r.message);
        }
        for bad in [
            r#"{"id":"e1","expires_at":"tomorrow"}"#,
            r#"{"id":"e1","expires_at":5}"#,
            r#"{"id":"e1","by":""}"#,
            r#"{"id":"e1","by":7}"#,
            r#"{"id":"e1","by":"a\u0007b"}"#,
        ] {
            let r = parse_command("ping", bad.as_bytes()).unwrap_err();
            assert_eq!((r.code, r.id.map(|i| i.to_string())), (ErrorCode::InvalidValue, Some("e1".into())), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn packages_round_trip(names in proptest::collection::vec("[a-z0-9][a-z0-9+.-]{1,20}(=[0-9][a-z0-9.+~]{0,8})?", 1..5), dry in any::<bool>()) {
            let packages: Vec<PackageSpec> = names.iter().map(|n| PackageSpec::parse(n).unwrap()).collect();
            let args = CommandArgs::Install { packages, options: PackageOptions { dry_run: dry, watch_s: None } };
            let id = OpId::new("x").unwrap();
            prop_assert_eq!(parse_command("install", &args.to_payload(&id)).unwrap().args, args);
        }

        #[test]
        fn never_panics_on_bytes(verb in "[a-z]{1,8}", payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_command(&verb, &payload);
        }

        #[test]
        fn never_panics_on_objects(id in "\\PC{0,70}", set in "\\PC{0,30}") {
            let payload = serde_json::json!({"id": id, "set": set}).to_string();
            for verb in ["ping", "cfg", "clear", "restart", "refresh", "zap"] {
                let _ = parse_command(verb, payload.as_bytes());
            }
        }
    }
}
