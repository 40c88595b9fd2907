//! The agent's configuration file (TOML) and the runtime overrides set over the wire.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    #[serde(default)]
    reconnect: ReconnectCfg,
    #[serde(default)]
    ops: OpsCfg,
    #[serde(default)]
    apt: AptCfg,
    #[serde(default)]
    deltas: DeltasCfg,
    #[serde(default = "default_keep_alive")]
    keep_alive_s: u16,
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
fn default_keep_alive() -> u16 {
    30
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
    pub labels: BTreeMap<String, String>,
    pub packages: Vec<String>,
    pub reconnect: ReconnectCfg,
    pub ops: OpsCfg,
    pub apt: AptCfg,
    pub deltas: DeltasCfg,
    pub keep_alive: Duration,
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
        let file_runtime = RuntimeCfg::default().apply_patch(&Value::Object(patch))?;
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
        if f.keep_alive_s < 5 {
            bail!("keep_alive_s: {} is below 5 seconds", f.keep_alive_s);
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
            labels: f.labels,
            packages: f.packages,
            reconnect: f.reconnect,
            ops: f.ops,
            apt: f.apt,
            deltas: f.deltas,
            keep_alive: Duration::from_secs(f.keep_alive_s.into()),
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
    pub fn effective(&mut self, file: &RuntimeCfg) -> RuntimeCfg {
        match file.apply_patch(&self.patch) {
            Ok(cfg) => cfg,
            Err(e) => {
                tracing::warn!("ignoring stored configuration overrides ({e}); using the file's values");
                self.patch = Value::Object(Default::default());
                file.clone()
            }
        }
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
        let mut o = Overrides::load(dir.path());
        o.add(&serde_json::json!({"telemetry": {"cpu": {"interval_s": 3}}})).unwrap();
        o.add(&serde_json::json!({"telemetry": {"cpu": {"enabled": false}}})).unwrap();
        let eff = Overrides::load(dir.path()).effective(&file);
        assert_eq!((eff.telemetry.cpu.interval_s, eff.telemetry.cpu.enabled), (3, false));
        assert_eq!(eff.telemetry.memory, file.telemetry.memory);
    }
}
