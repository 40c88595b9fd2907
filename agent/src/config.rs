//! The agent's configuration file (TOML) and the runtime overrides set over the wire.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use debfleet_protocol::debian::valid_package_name;
use debfleet_protocol::{DeviceId, RuntimeCfg, Topics};
use serde::Deserialize;
use serde_json::Value;

use crate::fsutil::write_atomic;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    /// Defaults to the host name (lower-cased, other characters as '-').
    #[serde(default)]
    device_id: Option<String>,
    broker: String,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default = "default_prefix")]
    prefix: String,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default = "default_dpkg_admindir")]
    dpkg_admindir: PathBuf,
    /// Where components connect (a Unix socket); "" turns components off.
    #[serde(default = "default_components_socket")]
    components_socket: PathBuf,
    /// Run only commands signed by a key in `operators_dir` (see the contract: Signature).
    #[serde(default)]
    require_signed_commands: bool,
    #[serde(default = "default_operators_dir")]
    operators_dir: PathBuf,
    /// `journal` may read any unit's journal, not only the managed packages' and the agent's.
    #[serde(default)]
    journal_any_unit: bool,
    /// Remote sessions: `debfleet shell` and `debfleet forward` (off unless enabled here).
    #[serde(default)]
    remote: RemoteCfg,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    packages: Vec<String>,
    #[serde(default)]
    telemetry: Option<toml::Table>,
    #[serde(default)]
    logs: Option<toml::Table>,
    /// `default` or `cellular`: the defaults of the runtime keys below.
    #[serde(default)]
    profile: Option<String>,
    #[serde(default)]
    link: Option<toml::Table>,
    #[serde(default)]
    budget: Option<toml::Table>,
    #[serde(default)]
    outbox: Option<toml::Table>,
    #[serde(default)]
    reconnect: ReconnectCfg,
    #[serde(default)]
    ops: OpsCfg,
    #[serde(default)]
    apt: AptCfg,
    #[serde(default)]
    deltas: DeltasCfg,
    /// MQTT protocol level: `auto` (5, or 3.1.1 when the broker refuses 5), `5`, `3.1.1`.
    #[serde(default = "default_mqtt")]
    mqtt: debfleet_mqtt::Protocol,
    /// Kept for existing files: the same as `link.keepalive_s`.
    #[serde(default)]
    keep_alive_s: Option<u32>,
}

fn default_mqtt() -> debfleet_mqtt::Protocol {
    debfleet_mqtt::Protocol::Auto
}

fn default_prefix() -> String {
    "debfleet".into()
}
fn default_state_dir() -> PathBuf {
    "/var/lib/debfleet".into()
}
fn default_dpkg_admindir() -> PathBuf {
    "/var/lib/dpkg".into()
}
fn default_operators_dir() -> PathBuf {
    PathBuf::from("/etc/debfleet/operators.d")
}

fn default_components_socket() -> PathBuf {
    debfleet_protocol::component::SOCKET_PATH.into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconnectCfg {
    /// First delay after a lost connection; doubles on each failed attempt.
    pub initial_delay_ms: u64,
    /// Cap of the delay.
    pub max_delay_s: u64,
}

impl Default for ReconnectCfg {
    fn default() -> Self {
        ReconnectCfg { initial_delay_ms: 500, max_delay_s: 30 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsCfg {
    /// Finished operations stay retained on the broker this long.
    pub keep_finished_s: u64,
    /// At most this many operation records are retained on the broker at once.
    pub max_retained: usize,
    /// Operation ids remembered for deduplication (and their outcomes), on disk.
    pub journal_size: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AptCfg {
    /// Seconds to wait for another package manager's dpkg lock.
    pub lock_timeout_s: u32,
    /// Seconds to watch a changed package's units at most before calling the change good (0:
    /// don't watch).
    pub watch_s: u32,
    /// The watch ends early once every unit has been steady (active, or inactive without
    /// failing) this many seconds. A command that names its own `watch_s` watches the whole
    /// window instead.
    pub settle_s: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeltasCfg {
    /// Fetch packages by delta where the repository lists one from the installed version.
    pub enabled: bool,
    /// The most the kept copies of installed packages (the bases of deltas) may take, in MiB.
    pub keep_mb: u64,
}

/// `[remote]`: what an operator may open on this device. Only this file says so: nothing over
/// the wire changes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteCfg {
    /// `debfleet shell` may open a terminal.
    pub shell: bool,
    /// Whose login shell the terminal runs; required with `shell = true` (root only when
    /// written here).
    pub user: Option<String>,
    /// Where `debfleet forward` may connect (`HOST:PORT` each).
    pub forward: Vec<String>,
    /// A session with nothing sent either way for this long ends.
    pub idle_timeout_s: u64,
    /// Sessions open at once.
    pub max_sessions: usize,
}

impl Default for RemoteCfg {
    fn default() -> Self {
        RemoteCfg { shell: false, user: None, forward: Vec::new(), idle_timeout_s: 900, max_sessions: 4 }
    }
}

impl Default for DeltasCfg {
    fn default() -> Self {
        DeltasCfg { enabled: true, keep_mb: 512 }
    }
}

impl Default for AptCfg {
    fn default() -> Self {
        AptCfg { lock_timeout_s: 120, watch_s: 30, settle_s: 3 }
    }
}

impl Default for OpsCfg {
    fn default() -> Self {
        OpsCfg { keep_finished_s: 86_400, max_retained: 50, journal_size: 1024 }
    }
}

pub use debfleet_protocol::broker::BrokerUrl as BrokerAddr;

/// Everything the agent needs to run, validated.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub device_id: DeviceId,
    pub broker: BrokerAddr,
    pub ca_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub topics: Topics,
    pub state_dir: PathBuf,
    pub dpkg_admindir: PathBuf,
    /// `None`: components are off.
    pub components_socket: Option<PathBuf>,
    /// `Some(operators_dir)`: only commands signed by a key there run.
    pub signed_commands: Option<PathBuf>,
    pub journal_any_unit: bool,
    pub remote: RemoteCfg,
    pub labels: BTreeMap<String, String>,
    pub packages: Vec<String>,
    pub reconnect: ReconnectCfg,
    pub ops: OpsCfg,
    pub apt: AptCfg,
    pub deltas: DeltasCfg,
    pub mqtt: debfleet_mqtt::Protocol,
    /// The runtime keys the file sets (its profile included), the bottom layer under the
    /// overrides from the wire.
    pub file_patch: Value,
    /// The runtime configuration as the file sets it, before overrides from the wire.
    pub file_runtime: RuntimeCfg,
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("configuration {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<AgentConfig> {
        let f: FileConfig = toml::from_str(text)?;
        let device_id = match f.device_id {
            Some(id) => DeviceId::new(id).context("device_id")?,
            None => id_from_hostname(&crate::identity::Identity::read().hostname)
                .context("device_id: not set, and the host name does not make a valid id; set device_id")?,
        };
        let broker = BrokerAddr::parse(&f.broker).map_err(anyhow::Error::msg).context("broker")?;
        if broker.tls && f.ca_file.is_none() {
            bail!("ca_file: required with an mqtts:// broker (the CA that signed the broker's certificate)");
        }
        let topics = Topics::new(&f.prefix)
            .map_err(|_| anyhow::anyhow!("prefix: {:?} is not a valid topic prefix", f.prefix))?;
        if !f.state_dir.is_absolute() {
            bail!("state_dir: {:?} must be an absolute path", f.state_dir);
        }
        let mut patch = serde_json::Map::new();
        patch.insert("groups".into(), Value::from(f.groups));
        if let Some(t) = f.telemetry {
            patch.insert("telemetry".into(), serde_json::to_value(t)?);
        }
        if let Some(l) = f.logs {
            patch.insert("logs".into(), serde_json::to_value(l)?);
        }
        if let Some(p) = f.profile {
            patch.insert("profile".into(), Value::String(p));
        }
        let mut link =
            f.link.map(serde_json::to_value).transpose()?.unwrap_or_else(|| Value::Object(Default::default()));
        if let (Some(k), Value::Object(l)) = (f.keep_alive_s, &mut link) {
            if l.contains_key("keepalive_s") {
                bail!("keep_alive_s: set link.keepalive_s or keep_alive_s, not both");
            }
            l.insert("keepalive_s".into(), Value::from(k));
        }
        if link.as_object().is_some_and(|l| !l.is_empty()) {
            patch.insert("link".into(), link);
        }
        for (key, table) in [("budget", f.budget), ("outbox", f.outbox)] {
            if let Some(t) = table {
                patch.insert(key.into(), serde_json::to_value(t)?);
            }
        }
        let file_patch = Value::Object(patch);
        let file_runtime = RuntimeCfg::compose(&[&file_patch])?;
        for p in &f.packages {
            if !valid_package_name(p) {
                bail!("packages: {p:?} is not a Debian package name");
            }
        }
        if f.reconnect.initial_delay_ms == 0 || f.reconnect.max_delay_s == 0 {
            bail!("reconnect: delays must be greater than 0");
        }
        if f.ops.journal_size == 0 || f.ops.max_retained == 0 {
            bail!("ops: journal_size and max_retained must be greater than 0");
        }
        if f.remote.shell && f.remote.user.as_deref().is_none_or(str::is_empty) {
            bail!("remote.user: name the user whose login shell `debfleet shell` opens (root only if written here)");
        }
        if let Some(bad) = f.remote.forward.iter().find(|t| !debfleet_protocol::session::valid_forward_target(t)) {
            bail!("remote.forward: {bad:?} is not HOST:PORT");
        }
        if f.remote.idle_timeout_s == 0 || f.remote.max_sessions == 0 {
            bail!("remote: idle_timeout_s and max_sessions must be greater than 0");
        }
        let password = match &f.password_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("password_file: reading {}", p.display()))?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
            ),
            None => None,
        };
        Ok(AgentConfig {
            device_id,
            broker,
            ca_file: f.ca_file,
            username: f.username,
            password,
            topics,
            state_dir: f.state_dir,
            dpkg_admindir: f.dpkg_admindir,
            components_socket: (!f.components_socket.as_os_str().is_empty()).then_some(f.components_socket),
            signed_commands: f.require_signed_commands.then_some(f.operators_dir),
            journal_any_unit: f.journal_any_unit,
            remote: f.remote,
            labels: f.labels,
            packages: f.packages,
            reconnect: f.reconnect,
            ops: f.ops,
            apt: f.apt,
            deltas: f.deltas,
            mqtt: f.mqtt,
            file_patch,
            file_runtime,
        })
    }
}

/// A device id from a host name: lower case, anything outside `[a-z0-9_-]` becomes '-'.
pub fn id_from_hostname(hostname: &str) -> Result<DeviceId> {
    let mut id: String = hostname
        .trim()
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '-' })
        .collect();
    id = id.trim_start_matches(['-', '_']).chars().take(63).collect();
    Ok(DeviceId::new(id)?)
}

/// Overrides set with the `cfg` command, kept as one accumulated patch so that later edits of
/// the file still apply to every key the wire never touched.
pub struct Overrides {
    path: PathBuf,
    patch: Value,
}

impl Overrides {
    pub fn load(state_dir: &Path) -> Overrides {
        let path = state_dir.join("cfg-overrides.json");
        let patch = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .filter(Value::is_object)
            .unwrap_or_else(|| Value::Object(Default::default()));
        Overrides { path, patch }
    }

    /// The file's runtime configuration with the overrides on top. Overrides that no longer
    /// fit (the file changed under them) are dropped with a warning rather than blocking start.
    pub fn effective(&mut self, file_patch: &Value) -> RuntimeCfg {
        match RuntimeCfg::compose(&[file_patch, &self.patch]) {
            Ok(cfg) => cfg,
            Err(e) => {
                tracing::warn!("ignoring stored configuration overrides ({e}); using the file's values");
                self.patch = Value::Object(Default::default());
                RuntimeCfg::compose(&[file_patch]).unwrap_or_default()
            }
        }
    }

    /// What the configuration would be with `patch` added (nothing is recorded).
    pub fn with(&self, patch: &Value, file_patch: &Value) -> Result<RuntimeCfg, debfleet_protocol::CfgError> {
        if !patch.is_object() {
            return Err(debfleet_protocol::CfgError::NotAnObject);
        }
        let mut merged = self.patch.clone();
        deep_merge(&mut merged, patch);
        // Errors name the key of this change, checked on its own first.
        RuntimeCfg::compose(&[file_patch, &self.patch])?.apply_patch(patch)?;
        RuntimeCfg::compose(&[file_patch, &merged])
    }

    /// Records a validated patch durably.
    pub fn add(&mut self, patch: &Value) -> std::io::Result<()> {
        let mut merged = self.patch.clone();
        deep_merge(&mut merged, patch);
        write_atomic(&self.path, serde_json::to_string_pretty(&merged)?.as_bytes(), true)?;
        self.patch = merged;
        Ok(())
    }
}

fn deep_merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                match t.get_mut(k) {
                    Some(slot) if slot.is_object() && v.is_object() => deep_merge(slot, v),
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "device_id = \"dev-1\"\nbroker = \"mqtt://127.0.0.1:1883\"\nstate_dir = \"/tmp/x\"\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = AgentConfig::parse(MINIMAL).unwrap();
        assert_eq!(c.device_id.as_str(), "dev-1");
        assert_eq!(c.broker, BrokerAddr { host: "127.0.0.1".into(), port: 1883, tls: false });
        assert_eq!(c.file_runtime, RuntimeCfg::default());
    }

    #[test]
    fn sections_override_defaults() {
        let text = format!("{MINIMAL}groups=[\"lab\"]\n[telemetry.cpu]\ninterval_s = 1\n[logs]\nlevel = \"debug\"\n");
        let c = AgentConfig::parse(&text).unwrap();
        assert_eq!(c.file_runtime.telemetry.cpu.interval_s, 1);
        assert_eq!(c.file_runtime.telemetry.cpu.threshold, 1.0);
        assert_eq!(c.file_runtime.logs.level, "debug");
        assert_eq!(c.file_runtime.groups[0].as_str(), "lab");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("device_id = \"Bad\"\nbroker = \"mqtt://h\"\n", "device_id"),
            ("device_id = \"d\"\nbroker = \"http://h\"\n", "broker"),
            ("device_id = \"d\"\nbroker = \"mqtts://h\"\n", "ca_file"),
            ("device_id = \"d\"\nbroker = \"mqtt://h\"\nbogus = 1\n", "bogus"),
            ("device_id = \"d\"\nbroker = \"mqtt://h\"\n[telemetry.cpu]\ninterval_s = 0\n", "telemetry.cpu.interval_s"),
            ("device_id = \"d\"\nbroker = \"mqtt://h\"\npackages = [\"Bad;rm\"]\n", "packages"),
            ("device_id = \"\"\nbroker = \"mqtt://h\"\n", "device_id"),
        ];
        for (text, key) in cases {
            let err = format!("{:#}", AgentConfig::parse(text).unwrap_err());
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn device_id_defaults_to_the_host_name() {
        assert_eq!(id_from_hostname("Kiosk.12.local").unwrap().as_str(), "kiosk-12-local");
        assert_eq!(id_from_hostname("-x").unwrap().as_str(), "x");
        assert!(id_from_hostname("").is_err());
        let c = AgentConfig::parse("broker = \"mqtt://h\"\nstate_dir = \"/tmp/x\"\n").unwrap();
        assert!(!c.device_id.as_str().is_empty());
    }

    #[test]
    fn overrides_accumulate_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let file = RuntimeCfg::default();
        let file_patch = serde_json::json!({});
        let mut o = Overrides::load(dir.path());
        o.add(&serde_json::json!({"telemetry": {"cpu": {"interval_s": 3}}})).unwrap();
        o.add(&serde_json::json!({"telemetry": {"cpu": {"enabled": false}}})).unwrap();
        let eff = Overrides::load(dir.path()).effective(&file_patch);
        assert_eq!((eff.telemetry.cpu.interval_s, eff.telemetry.cpu.enabled), (3, false));
        assert_eq!(eff.telemetry.memory, file.telemetry.memory);
    }

    #[test]
    fn the_cellular_profile_from_the_file_and_from_the_wire() {
        let c = AgentConfig::parse(&format!("{MINIMAL}profile = \"cellular\"\n[link]\nkeepalive_s = 600\n")).unwrap();
        assert_eq!((c.file_runtime.link.keepalive_s, c.file_runtime.logs.level.as_str()), (600, "warn"));
        assert!(c.file_runtime.link.persistent_session);
        let err = format!("{:#}", AgentConfig::parse(&format!("{MINIMAL}profile = \"lte\"\n")).unwrap_err());
        assert!(err.contains("profile"), "{err}");
        let old = AgentConfig::parse(&format!("{MINIMAL}keep_alive_s = 45\n")).unwrap();
        assert_eq!(old.file_runtime.link.keepalive_s, 45);
        // The wire switches a default device to cellular; the file's own keys still win.
        let dir = tempfile::tempdir().unwrap();
        let o = Overrides::load(dir.path());
        let eff = o.with(&serde_json::json!({"profile": "cellular"}), &old.file_patch).unwrap();
        assert_eq!((eff.link.keepalive_s, eff.telemetry.window_s), (45, 3600));
        let err = o.with(&serde_json::json!({"link": {"keepalive_s": 1}}), &old.file_patch).unwrap_err().to_string();
        assert!(err.starts_with("link.keepalive_s"), "{err}");
    }
}
