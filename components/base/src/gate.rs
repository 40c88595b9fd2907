//! What the runtime owns in every component's configuration — `logs` (level, batching, rate
//! limit) and `telemetry.METRIC` (enabled, interval, threshold) — and the gates that apply
//! them, so every component streams the same way and none has to write it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use debfleet_protocol::cfg::{LogsCfg, MetricCfg};
use debfleet_protocol::component::ComponentTelemetry;
use debfleet_protocol::{LogBatch, LogLine, CONTRACT_VERSION};
use serde_json::{Map, Value};

/// Log levels, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        [Level::Error, Level::Warn, Level::Info, Level::Debug, Level::Trace].into_iter().find(|l| l.as_str() == s)
    }
}

/// Lines kept while they cannot go (no connection): beyond it the oldest are dropped, counted.
const MAX_PENDING_LINES: usize = 500;

pub fn default_logs() -> LogsCfg {
    LogsCfg { enabled: true, level: "error".into(), batch_s: 10, max_lines_per_min: 60 }
}

pub fn default_metric() -> MetricCfg {
    MetricCfg { enabled: true, interval_s: 10, threshold: 1.0 }
}

/// The runtime's keys of a configuration, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Streams {
    pub logs: LogsCfg,
    pub telemetry: BTreeMap<String, MetricCfg>,
}

impl Streams {
    /// From a whole configuration: `logs` and `telemetry` as given, over the defaults, for the
    /// component's metrics (a metric it does not have is an error).
    pub fn from_cfg(cfg: &Map<String, Value>, metrics: &[String]) -> Result<Streams, String> {
        let logs = match cfg.get("logs") {
            None => default_logs(),
            Some(v) => {
                let mut base = serde_json::to_value(default_logs()).map_err(|e| e.to_string())?;
                merge(&mut base, v);
                let l: LogsCfg = serde_json::from_value(base).map_err(|e| format!("logs: {e}"))?;
                if Level::parse(&l.level).is_none() {
                    return Err(format!("logs.level: {:?} is not error, warn, info, debug or trace", l.level));
                }
                if l.batch_s == 0 || l.batch_s > 3600 {
                    return Err("logs.batch_s must be in 1..=3600".into());
                }
                l
            }
        };
        let mut telemetry: BTreeMap<String, MetricCfg> =
            metrics.iter().map(|m| (m.clone(), default_metric())).collect();
        match cfg.get("telemetry") {
            None => {}
            Some(Value::Object(t)) => {
                for (name, v) in t {
                    let Some(slot) = telemetry.get_mut(name) else {
                        return Err(format!("telemetry: no metric {name:?} (it has {})", metrics.join(", ")));
                    };
                    let mut base = serde_json::to_value(&*slot).map_err(|e| e.to_string())?;
                    merge(&mut base, v);
                    let m: MetricCfg = serde_json::from_value(base).map_err(|e| format!("telemetry.{name}: {e}"))?;
                    // NaN is no threshold either.
                    if m.interval_s == 0 || m.threshold.is_nan() || m.threshold < 0.0 {
                        return Err(format!(
                            "telemetry.{name}: interval_s must be at least 1 and threshold not negative"
                        ));
                    }
                    *slot = m;
                }
            }
            Some(_) => return Err("telemetry: expected an object of metrics".into()),
        }
        Ok(Streams { logs, telemetry })
    }
}

/// Merges a patch into a value: objects key by key, `null` removes a key, anything else
/// replaces.
pub fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(k);
                } else {
                    merge(b.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// Log lines gated by level and rate, batched.
#[derive(Default)]
pub struct LogGate {
    lines: Vec<LogLine>,
    dropped: u64,
    minute: Option<(Instant, u32)>,
    last_batch: Option<Instant>,
}

impl LogGate {
    pub fn push(&mut self, cfg: &LogsCfg, now: Instant, level: Level, target: &str, msg: &str) {
        if !cfg.enabled || Level::parse(&cfg.level).is_none_or(|l| level > l) {
            return;
        }
        let (start, n) = self.minute.get_or_insert((now, 0));
        if now.duration_since(*start) >= Duration::from_secs(60) {
            (*start, *n) = (now, 0);
        }
        if *n >= cfg.max_lines_per_min {
            self.dropped += 1;
            return;
        }
        *n += 1;
        if self.lines.len() >= MAX_PENDING_LINES {
            self.lines.remove(0);
            self.dropped += 1;
        }
        let msg: String = msg.chars().take(debfleet_protocol::limits::MAX_LOG_LINE_CHARS).collect();
        self.lines.push(LogLine {
            ts: debfleet_protocol::time::now(),
            level: level.as_str().into(),
            target: target.into(),
            msg,
        });
    }

    /// The batch due now, if any.
    pub fn batch(&mut self, cfg: &LogsCfg, now: Instant) -> Option<LogBatch> {
        let last = *self.last_batch.get_or_insert(now);
        if (self.lines.is_empty() && self.dropped == 0)
            || now.duration_since(last) < Duration::from_secs(cfg.batch_s.into())
        {
            return None;
        }
        self.last_batch = Some(now);
        let mut lines = Vec::new();
        let mut size = 0;
        // One batch stays within the logs topic's limit; the rest waits for the next.
        while let Some(l) = self.lines.first() {
            size += l.msg.len() + l.target.len() + 80;
            if size > debfleet_protocol::limits::MAX_LOG_BATCH_BYTES - 1024 && !lines.is_empty() {
                break;
            }
            lines.push(self.lines.remove(0));
        }
        let dropped = std::mem::take(&mut self.dropped);
        Some(LogBatch { v: CONTRACT_VERSION, ts: debfleet_protocol::time::now(), lines, dropped })
    }
}

/// Metrics gated by interval and threshold; the retained view holds the latest published
/// value of each enabled metric.
#[derive(Default)]
pub struct MetricGate {
    sampled: BTreeMap<String, Instant>,
    published: BTreeMap<String, f64>,
}

impl MetricGate {
    /// Whether any enabled metric is due for a sample.
    pub fn due(&self, cfg: &BTreeMap<String, MetricCfg>, now: Instant) -> bool {
        cfg.iter().any(|(name, m)| {
            m.enabled
                && self
                    .sampled
                    .get(name)
                    .is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(m.interval_s.into()))
        })
    }

    /// Offers a sample of every metric; returns the view to publish when a due metric moved
    /// past its threshold (or a metric was switched off).
    pub fn offer(
        &mut self,
        cfg: &BTreeMap<String, MetricCfg>,
        now: Instant,
        sample: &BTreeMap<String, f64>,
    ) -> Option<ComponentTelemetry> {
        let mut moved = false;
        for (name, m) in cfg {
            if !m.enabled {
                moved |= self.published.remove(name).is_some();
                self.sampled.remove(name);
                continue;
            }
            let due = self
                .sampled
                .get(name)
                .is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(m.interval_s.into()));
            let Some(&v) = sample.get(name).filter(|v| v.is_finite()) else { continue };
            if !due {
                continue;
            }
            self.sampled.insert(name.clone(), now);
            if self.published.get(name).is_none_or(|last| (v - last).abs() >= m.threshold) {
                self.published.insert(name.clone(), v);
                moved = true;
            }
        }
        moved.then(|| ComponentTelemetry {
            v: CONTRACT_VERSION,
            ts: debfleet_protocol::time::now(),
            metrics: self.published.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn stream_keys_over_defaults_and_checked() {
        let metrics = vec!["fps".to_owned()];
        let s = Streams::from_cfg(
            &obj(json!({"logs": {"level": "info"}, "telemetry": {"fps": {"interval_s": 2}}})),
            &metrics,
        )
        .unwrap();
        assert_eq!(s.logs.level, "info");
        assert_eq!(s.logs.batch_s, 10);
        assert_eq!(s.telemetry["fps"].interval_s, 2);
        assert!(s.telemetry["fps"].enabled);
        for (bad, says) in [
            (json!({"logs": {"level": "loud"}}), "logs.level"),
            (json!({"logs": {"batch_s": "x"}}), "logs:"),
            (json!({"telemetry": {"heat": {}}}), "no metric \"heat\""),
            (json!({"telemetry": {"fps": {"interval_s": 0}}}), "interval_s"),
            (json!({"telemetry": 3}), "expected an object"),
        ] {
            let e = Streams::from_cfg(&obj(bad.clone()), &metrics).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn logs_by_level_rate_and_batch() {
        let cfg = LogsCfg { enabled: true, level: "warn".into(), batch_s: 5, max_lines_per_min: 3 };
        let mut g = LogGate::default();
        let t0 = Instant::now();
        assert!(g.batch(&cfg, t0).is_none());
        g.push(&cfg, t0, Level::Info, "x", "quiet");
        for i in 0..5 {
            g.push(&cfg, t0, Level::Error, "x", &format!("e{i}"));
        }
        assert!(g.batch(&cfg, t0 + Duration::from_secs(1)).is_none(), "not before batch_s");
        let b = g.batch(&cfg, t0 + Duration::from_secs(5)).unwrap();
        assert_eq!(b.lines.iter().map(|l| l.msg.as_str()).collect::<Vec<_>>(), ["e0", "e1", "e2"]);
        assert_eq!(b.dropped, 2);
        g.push(&cfg, t0 + Duration::from_secs(61), Level::Warn, "x", "later");
        assert_eq!(g.batch(&cfg, t0 + Duration::from_secs(70)).unwrap().lines.len(), 1);
    }

    #[test]
    fn metrics_by_interval_and_threshold() {
        let mut cfg = BTreeMap::from([("fps".to_owned(), MetricCfg { enabled: true, interval_s: 10, threshold: 2.0 })]);
        let mut g = MetricGate::default();
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let sample = |v: f64| BTreeMap::from([("fps".to_owned(), v)]);
        assert!(g.due(&cfg, t0));
        assert_eq!(g.offer(&cfg, t0, &sample(60.0)).unwrap().metrics["fps"], 60.0);
        assert!(!g.due(&cfg, at(5)));
        assert!(g.offer(&cfg, at(5), &sample(10.0)).is_none(), "not due");
        assert!(g.offer(&cfg, at(10), &sample(61.0)).is_none(), "within the threshold");
        assert_eq!(g.offer(&cfg, at(20), &sample(57.0)).unwrap().metrics["fps"], 57.0);
        cfg.get_mut("fps").unwrap().enabled = false;
        assert!(g.offer(&cfg, at(30), &sample(57.0)).unwrap().metrics.is_empty(), "switched off: leaves the view");
        assert!(!g.due(&cfg, at(40)));
    }
}
