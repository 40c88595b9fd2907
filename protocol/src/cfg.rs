//! The runtime configuration a device publishes on `cfg` and accepts partial updates to.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ids::GroupName;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuntimeCfg {
    pub groups: Vec<GroupName>,
    pub telemetry: TelemetryCfg,
    pub logs: LogsCfg,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryCfg {
    pub cpu: MetricCfg,
    pub memory: MetricCfg,
    pub disk: DiskCfg,
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
        RuntimeCfg { groups: Vec::new(), telemetry: TelemetryCfg::default(), logs: LogsCfg::default() }
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
        let mut current = serde_json::to_value(self).expect("configuration serializes");
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
