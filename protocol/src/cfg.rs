//! The runtime configuration a device publishes on `cfg` and accepts partial updates to.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ids::GroupName;

/// On the wire, a key at the default profile's value may be left out (and reads back as that
/// value): a wired device's `cfg` stays as small as it was before profiles existed. See
/// [`RuntimeCfg::full_value`] for every key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuntimeCfg {
    /// Which set of defaults the other keys start from (see [`RuntimeCfg::compose`]).
    #[serde(default, skip_serializing_if = "is_default")]
    pub profile: Profile,
    pub groups: Vec<GroupName>,
    pub telemetry: TelemetryCfg,
    pub logs: LogsCfg,
    #[serde(default, skip_serializing_if = "is_default")]
    pub link: LinkCfg,
    #[serde(default, skip_serializing_if = "is_default")]
    pub budget: BudgetCfg,
    #[serde(default, skip_serializing_if = "is_default")]
    pub outbox: OutboxCfg,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A named set of defaults: `default` for wired devices, `cellular` for metered links (long
/// keepalive, persistent session, aggregated telemetry, warnings only, a data budget).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    #[default]
    Default,
    Cellular,
}

impl Profile {
    pub const ALL: [Profile; 2] = [Profile::Default, Profile::Cellular];

    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Default => "default",
            Profile::Cellular => "cellular",
        }
    }
}

/// The connection to the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkCfg {
    /// MQTT keepalive: how often an idle connection is checked, and (×1.5) how long the broker
    /// waits before it declares the device lost. Changing it reconnects.
    pub keepalive_s: u32,
    /// Keep the MQTT session across reconnects (clean session off): the broker keeps the
    /// subscriptions and queues commands (QoS 1) while the device is away. Changing it reconnects.
    pub persistent_session: bool,
    /// MQTT 5: how long the broker keeps a kept session after a connection ends (3.1.1 brokers
    /// keep it until their own limit).
    #[serde(default = "default_session_expiry")]
    pub session_expiry_s: u32,
    /// After a reconnect into a kept session, publish only the retained facts that differ from
    /// what the broker acknowledged before.
    pub skip_unchanged: bool,
    /// Seconds between reports on `state/link` (also sent when the outbox has drained and on
    /// `refresh`).
    pub report_s: u32,
    /// Also report on every connect.
    #[serde(default)]
    pub report_connects: bool,
}

/// What the device may send in a day (UTC), by priority class.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BudgetCfg {
    /// 0: no budget. Over 70 % of it telemetry waits (in the outbox) or is dropped, over 90 %
    /// logs do too; operation results, status and acknowledgements always go.
    pub bytes_per_day: u64,
}

/// The on-disk outbox for telemetry and logs produced while the link is down or over budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxCfg {
    /// Bound of the outbox on disk; beyond it the oldest messages are dropped and counted.
    pub max_kb: u32,
    /// Messages sent from the outbox per second once the link is back.
    pub drain_per_s: u32,
}

fn default_session_expiry() -> u32 {
    7 * 86_400
}

impl Default for LinkCfg {
    fn default() -> Self {
        LinkCfg {
            keepalive_s: 30,
            persistent_session: false,
            session_expiry_s: default_session_expiry(),
            skip_unchanged: false,
            report_s: 86_400,
            report_connects: false,
        }
    }
}

impl Default for OutboxCfg {
    fn default() -> Self {
        OutboxCfg { max_kb: 256, drain_per_s: 10 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryCfg {
    pub cpu: MetricCfg,
    pub memory: MetricCfg,
    pub disk: DiskCfg,
    /// 0: every sample that moved past its threshold is sent. Otherwise samples are aggregated
    /// over this many seconds and sent as one message (mean, with min and max), and only when a
    /// mean moved past its threshold (the deadband) since the last one sent.
    #[serde(default, skip_serializing_if = "is_default")]
    pub window_s: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricCfg {
    pub enabled: bool,
    /// Seconds between samples.
    pub interval_s: u32,
    /// A sample is published only when it moved at least this many percentage points from the
    /// last published value (0 publishes every sample).
    pub threshold: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskCfg {
    pub enabled: bool,
    pub interval_s: u32,
    pub threshold: f64,
    pub mounts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogsCfg {
    pub enabled: bool,
    /// Lowest level sent: `error`, `warn`, `info`, `debug` or `trace`.
    pub level: String,
    /// Seconds between batches.
    pub batch_s: u32,
    /// Lines per minute beyond which lines are dropped and counted.
    pub max_lines_per_min: u32,
}

impl Default for MetricCfg {
    fn default() -> Self {
        MetricCfg { enabled: true, interval_s: 10, threshold: 1.0 }
    }
}

impl Default for TelemetryCfg {
    fn default() -> Self {
        TelemetryCfg {
            cpu: MetricCfg::default(),
            memory: MetricCfg { interval_s: 30, ..MetricCfg::default() },
            disk: DiskCfg { enabled: true, interval_s: 60, threshold: 1.0, mounts: vec!["/".into()] },
            window_s: 0,
        }
    }
}

impl Default for LogsCfg {
    fn default() -> Self {
        LogsCfg { enabled: true, level: "info".into(), batch_s: 5, max_lines_per_min: 120 }
    }
}

impl Default for RuntimeCfg {
    fn default() -> Self {
        RuntimeCfg {
            profile: Profile::Default,
            groups: Vec::new(),
            telemetry: TelemetryCfg::default(),
            logs: LogsCfg::default(),
            link: LinkCfg::default(),
            budget: BudgetCfg::default(),
            outbox: OutboxCfg::default(),
        }
    }
}

impl RuntimeCfg {
    /// The defaults of a profile. Cellular: a 20-minute keepalive (each keepalive exchange is
    /// about 160 bytes on the wire with TCP/IP headers), a kept session, telemetry as hourly
    /// aggregates with a 5-point deadband, warnings batched every 15 minutes, 256 KiB a day,
    /// `state/link` once a day and on every connect (every 6 h was ~0.06 MB a month).
    pub fn for_profile(profile: Profile) -> RuntimeCfg {
        let base = RuntimeCfg { profile, ..RuntimeCfg::default() };
        match profile {
            Profile::Default => base,
            Profile::Cellular => {
                let metric = MetricCfg { enabled: true, interval_s: 60, threshold: 5.0 };
                RuntimeCfg {
                    telemetry: TelemetryCfg {
                        cpu: metric.clone(),
                        memory: metric,
                        disk: DiskCfg { enabled: true, interval_s: 600, threshold: 2.0, mounts: vec!["/".into()] },
                        window_s: 3600,
                    },
                    logs: LogsCfg { enabled: true, level: "warn".into(), batch_s: 900, max_lines_per_min: 30 },
                    link: LinkCfg {
                        keepalive_s: 1200,
                        persistent_session: true,
                        session_expiry_s: default_session_expiry(),
                        skip_unchanged: true,
                        report_s: 86_400,
                        report_connects: true,
                    },
                    budget: BudgetCfg { bytes_per_day: 256 * 1024 },
                    outbox: OutboxCfg { max_kb: 1024, drain_per_s: 2 },
                    ..base
                }
            }
        }
    }

    /// Every key, those at the default profile's value included (for showing a configuration).
    pub fn full_value(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("configuration serializes");
        if let Some(o) = v.as_object_mut() {
            o.insert("profile".into(), serde_json::to_value(self.profile).expect("serializes"));
            o.insert("link".into(), serde_json::to_value(&self.link).expect("serializes"));
            o.insert("budget".into(), serde_json::to_value(&self.budget).expect("serializes"));
            o.insert("outbox".into(), serde_json::to_value(&self.outbox).expect("serializes"));
            if let Some(t) = o.get_mut("telemetry").and_then(Value::as_object_mut) {
                t.insert("window_s".into(), self.telemetry.window_s.into());
            }
        }
        v
    }

    /// The configuration from layered partial updates (the file's, then the wire's): the
    /// profile named last picks the defaults, then every patch applies in order, so a key set
    /// anywhere wins over the profile's default.
    pub fn compose(patches: &[&Value]) -> Result<RuntimeCfg, CfgError> {
        let mut profile = Profile::Default;
        for p in patches {
            if let Some(v) = p.get("profile") {
                profile = serde_json::from_value(v.clone()).map_err(|_| {
                    let names: Vec<&str> = Profile::ALL.iter().map(|p| p.as_str()).collect();
                    invalid("profile", format!("{v} is not one of {}", names.join(", ")))
                })?;
            }
        }
        let mut cfg = RuntimeCfg::for_profile(profile);
        for p in patches {
            cfg = cfg.apply_patch(p)?;
        }
        Ok(cfg)
    }
}

pub const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CfgError {
    #[error("{key}: unknown key")]
    UnknownKey { key: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    #[error("the update must be a JSON object of keys to change")]
    NotAnObject,
    #[error("{0:?} is not key=value")]
    NotAssignment(String),
}

fn invalid(key: &str, message: impl Into<String>) -> CfgError {
    CfgError::Invalid { key: key.into(), message: message.into() }
}

fn check_interval(key: &str, v: u32) -> Result<(), CfgError> {
    if (1..=86_400).contains(&v) {
        Ok(())
    } else {
        Err(invalid(key, format!("{v} is outside 1..=86400 seconds")))
    }
}

fn check_threshold(key: &str, v: f64) -> Result<(), CfgError> {
    if v.is_finite() && (0.0..=100.0).contains(&v) {
        Ok(())
    } else {
        Err(invalid(key, format!("{v} is outside 0..=100 percentage points")))
    }
}

impl RuntimeCfg {
    pub fn validate(&self) -> Result<(), CfgError> {
        if self.groups.len() > 32 {
            return Err(invalid("groups", "at most 32 groups"));
        }
        let t = &self.telemetry;
        for (name, m) in [("cpu", &t.cpu), ("memory", &t.memory)] {
            check_interval(&format!("telemetry.{name}.interval_s"), m.interval_s)?;
            check_threshold(&format!("telemetry.{name}.threshold"), m.threshold)?;
        }
        check_interval("telemetry.disk.interval_s", t.disk.interval_s)?;
        check_threshold("telemetry.disk.threshold", t.disk.threshold)?;
        if t.disk.mounts.len() > 16 {
            return Err(invalid("telemetry.disk.mounts", "at most 16 mount points"));
        }
        for m in &t.disk.mounts {
            if !m.starts_with('/') || m.len() > 256 || m.contains('\0') || m.split('/').any(|l| l == "..") {
                return Err(invalid("telemetry.disk.mounts", format!("{m:?} is not an absolute path")));
            }
        }
        if t.window_s > 86_400 {
            return Err(invalid("telemetry.window_s", format!("{} is outside 0..=86400 seconds", t.window_s)));
        }
        let k = &self.link;
        if !(5..=65_535).contains(&k.keepalive_s) {
            return Err(invalid("link.keepalive_s", format!("{} is outside 5..=65535 seconds", k.keepalive_s)));
        }
        if !(60..=30 * 86_400).contains(&k.session_expiry_s) {
            return Err(invalid(
                "link.session_expiry_s",
                format!("{} is outside 60..=2592000 seconds", k.session_expiry_s),
            ));
        }
        if !(60..=86_400).contains(&k.report_s) {
            return Err(invalid("link.report_s", format!("{} is outside 60..=86400 seconds", k.report_s)));
        }
        if self.budget.bytes_per_day != 0 && self.budget.bytes_per_day < 16 * 1024 {
            return Err(invalid("budget.bytes_per_day", "0 (no budget) or at least 16384"));
        }
        if self.outbox.max_kb > 1024 * 1024 {
            return Err(invalid("outbox.max_kb", format!("{} is over 1048576 (1 GiB)", self.outbox.max_kb)));
        }
        if !(1..=1000).contains(&self.outbox.drain_per_s) {
            return Err(invalid("outbox.drain_per_s", format!("{} is outside 1..=1000", self.outbox.drain_per_s)));
        }
        let l = &self.logs;
        if !LOG_LEVELS.contains(&l.level.as_str()) {
            return Err(invalid("logs.level", format!("{:?} is not one of {}", l.level, LOG_LEVELS.join(", "))));
        }
        if !(1..=3600).contains(&l.batch_s) {
            return Err(invalid("logs.batch_s", format!("{} is outside 1..=3600 seconds", l.batch_s)));
        }
        if !(1..=100_000).contains(&l.max_lines_per_min) {
            return Err(invalid("logs.max_lines_per_min", format!("{} is outside 1..=100000", l.max_lines_per_min)));
        }
        Ok(())
    }

    /// Applies a partial update (a JSON object shaped like this configuration, holding only the
    /// keys to change) and validates the result. Unknown keys and wrong types are errors naming the
    /// dotted key; `self` is untouched on error.
    pub fn apply_patch(&self, patch: &Value) -> Result<RuntimeCfg, CfgError> {
        let Value::Object(patch) = patch else {
            return Err(CfgError::NotAnObject);
        };
        let mut current = self.full_value();
        merge(&mut current, patch, "")?;
        let next: RuntimeCfg = serde_json::from_value(current).map_err(|e| invalid("cfg", e.to_string()))?;
        next.validate()?;
        Ok(next)
    }
}

fn merge(target: &mut Value, patch: &Map<String, Value>, path: &str) -> Result<(), CfgError> {
    for (key, new) in patch {
        let dotted = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
        let Some(slot) = target.as_object_mut().and_then(|o| o.get_mut(key)) else {
            return Err(CfgError::UnknownKey { key: dotted });
        };
        match (slot.is_object(), new) {
            (true, Value::Object(inner)) => merge(slot, inner, &dotted)?,
            (true, _) => return Err(invalid(&dotted, "is a section; set its keys instead")),
            (false, new) => {
                if !same_kind(slot, new) {
                    return Err(invalid(&dotted, format!("expected {}, got {new}", kind_name(slot))));
                }
                if slot.is_u64() && !new.is_u64() {
                    return Err(invalid(&dotted, format!("expected a whole number of at least 0, got {new}")));
                }
                *slot = new.clone();
            }
        }
    }
    Ok(())
}

fn same_kind(old: &Value, new: &Value) -> bool {
    matches!(
        (old, new),
        (Value::Bool(_), Value::Bool(_))
            | (Value::Number(_), Value::Number(_))
            | (Value::String(_), Value::String(_))
            | (Value::Array(_), Value::Array(_))
    )
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Bool(_) => "true or false",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a section",
        Value::Null => "a value",
    }
}

/// Every leaf of a JSON value with its dotted key (`telemetry.cpu.interval_s`), sorted by key:
/// how a configuration is shown and edited key by key (the keys `a.b.c=value` assignments name).
pub fn leaves(v: &Value) -> Vec<(String, Value)> {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
        match v {
            Value::Object(o) => {
                for (k, child) in o {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&key, child, out);
                }
            }
            other => out.push((prefix.to_owned(), other.clone())),
        }
    }
    let mut out = Vec::new();
    walk("", v, &mut out);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Turns `a.b.c=value` assignments into a patch object. A value that reads as JSON (number,
/// bool, list, quoted string) is taken as such; anything else is a string. A comma-separated
/// value without brackets is not split: lists are written as JSON (`mounts=["/","/data"]`).
pub fn patch_from_assignments<S: AsRef<str>>(assignments: &[S]) -> Result<Value, CfgError> {
    let mut root = Map::new();
    for a in assignments {
        let a = a.as_ref();
        let (key, raw) = a.split_once('=').ok_or_else(|| CfgError::NotAssignment(a.to_owned()))?;
        let key = key.trim();
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(CfgError::NotAssignment(a.to_owned()));
        }
        let value = serde_json::from_str::<Value>(raw.trim()).unwrap_or_else(|_| Value::String(raw.to_owned()));
        let mut levels: Vec<&str> = key.split('.').collect();
        let leaf = levels.pop().expect("non-empty key");
        let mut node = &mut root;
        for level in levels {
            let entry = node.entry(level.to_owned()).or_insert_with(|| Value::Object(Map::new()));
            node = match entry {
                Value::Object(o) => o,
                _ => return Err(invalid(key, "a value was already given for a parent key")),
            };
        }
        node.insert(leaf.to_owned(), value);
    }
    Ok(Value::Object(root))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_are_valid() {
        RuntimeCfg::default().validate().unwrap();
    }

    #[test]
    fn patch_changes_only_named_keys() {
        let cfg = RuntimeCfg::default();
        let next = cfg.apply_patch(&json!({"telemetry": {"cpu": {"interval_s": 2}}})).unwrap();
        assert_eq!(next.telemetry.cpu.interval_s, 2);
        assert_eq!(next.telemetry.memory, cfg.telemetry.memory);
        assert_eq!(next.logs, cfg.logs);
    }

    #[test]
    fn patch_errors_name_the_key() {
        let cfg = RuntimeCfg::default();
        let cases = [
            (json!({"telemetry": {"cpu": {"interval_s": 0}}}), "telemetry.cpu.interval_s"),
            (json!({"telemetry": {"cpu": {"bogus": 1}}}), "telemetry.cpu.bogus"),
            (json!({"logs": {"level": "loud"}}), "logs.level"),
            (json!({"logs": {"enabled": "yes"}}), "logs.enabled"),
            (json!({"telemetry": 5}), "telemetry"),
            (json!({"groups": ["Bad Group"]}), "cfg"),
            (json!({"telemetry": {"disk": {"mounts": ["relative"]}}}), "telemetry.disk.mounts"),
            (json!({"telemetry": {"cpu": {"interval_s": -3}}}), "telemetry.cpu.interval_s"),
        ];
        for (patch, key) in cases {
            let err = cfg.apply_patch(&patch).unwrap_err().to_string();
            assert!(err.starts_with(key), "{patch}: {err}");
        }
        assert_eq!(cfg.apply_patch(&json!([1])).unwrap_err(), CfgError::NotAnObject);
    }

    #[test]
    fn profiles_pick_defaults_and_every_key_still_wins() {
        let cell = json!({"profile": "cellular"});
        let c = RuntimeCfg::compose(&[&cell]).unwrap();
        assert_eq!(c, RuntimeCfg::for_profile(Profile::Cellular));
        assert!(c.link.persistent_session && c.telemetry.window_s > 0 && c.logs.level == "warn");
        // A file key wins over the profile; a later profile change keeps it.
        let file = json!({"profile": "cellular", "link": {"keepalive_s": 300}});
        let wire = json!({"logs": {"level": "error"}});
        let c = RuntimeCfg::compose(&[&file, &wire]).unwrap();
        assert_eq!((c.link.keepalive_s, c.logs.level.as_str(), c.budget.bytes_per_day), (300, "error", 256 * 1024));
        let back = json!({"profile": "default"});
        let d = RuntimeCfg::compose(&[&file, &wire, &back]).unwrap();
        assert_eq!((d.profile, d.link.keepalive_s, d.link.persistent_session), (Profile::Default, 300, false));
        let err = RuntimeCfg::compose(&[&json!({"profile": "satellite"})]).unwrap_err().to_string();
        assert!(err.starts_with("profile"), "{err}");
        for p in Profile::ALL {
            RuntimeCfg::for_profile(p).validate().unwrap();
        }
        let err = c.apply_patch(&json!({"link": {"keepalive_s": 2}})).unwrap_err().to_string();
        assert!(err.starts_with("link.keepalive_s"), "{err}");
    }

    #[test]
    fn assignments_build_nested_patches() {
        let p =
            patch_from_assignments(&["telemetry.cpu.interval_s=5", "logs.level=debug", "telemetry.cpu.enabled=false"])
                .unwrap();
        assert_eq!(p, json!({"telemetry": {"cpu": {"interval_s": 5, "enabled": false}}, "logs": {"level": "debug"}}));
        assert!(patch_from_assignments(&["novalue"]).is_err());
        assert!(patch_from_assignments(&["a..b=1"]).is_err());
        assert!(patch_from_assignments(&["a=1", "a.b=2"]).is_err());
    }
}
