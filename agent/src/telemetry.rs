//! Telemetry: each metric sampled on its own interval and published only when it moved past its
//! threshold. The gating is pure; the probe reads the system.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use debfleet_protocol::cfg::TelemetryCfg;
use debfleet_protocol::{time, Telemetry, CONTRACT_VERSION};

/// Where samples come from: the running system in production, a script in tests.
pub trait Probe {
    /// Percent of CPU time busy since the previous call.
    fn cpu(&mut self) -> f64;
    fn memory(&mut self) -> f64;
    /// Percent of the file system holding `mount` in use; `None` when it cannot be read.
    fn disk(&mut self, mount: &str) -> Option<f64>;
}

pub struct SystemProbe {
    sys: sysinfo::System,
}

impl SystemProbe {
    /// Takes the first CPU reading now, so the first reported CPU value covers a real interval
    /// instead of being the meaningless "since boot" figure.
    pub fn new() -> SystemProbe {
        let mut sys = sysinfo::System::new();
        sys.refresh_cpu_usage();
        SystemProbe { sys }
    }
}

impl Probe for SystemProbe {
    fn cpu(&mut self) -> f64 {
        self.sys.refresh_cpu_usage();
        round(self.sys.global_cpu_usage() as f64)
    }

    fn memory(&mut self) -> f64 {
        self.sys.refresh_memory();
        let total = self.sys.total_memory();
        if total == 0 {
            return 0.0;
        }
        round(100.0 * (total.saturating_sub(self.sys.available_memory())) as f64 / total as f64)
    }

    fn disk(&mut self, mount: &str) -> Option<f64> {
        let path = std::ffi::CString::new(mount).ok()?;
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: path is NUL-terminated and st is a valid out-pointer for the call.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return None;
        }
        let frsize = st.f_frsize as f64;
        let total = st.f_blocks as f64 * frsize;
        // "Used" as df computes it: the space non-root users can no longer get.
        let used = (st.f_blocks - st.f_bfree) as f64 * frsize;
        let avail = st.f_bavail as f64 * frsize;
        if total <= 0.0 || used + avail <= 0.0 {
            return None;
        }
        Some(round(100.0 * used / (used + avail)))
    }
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

#[derive(Default)]
struct Gate {
    sampled_at: Option<Instant>,
    published: Option<f64>,
}

impl Gate {
    fn due(&self, now: Instant, interval_s: u32) -> bool {
        self.sampled_at
            .is_none_or(|t| now.duration_since(t) + Duration::from_millis(50) >= Duration::from_secs(interval_s.into()))
    }

    /// Marks a sample taken; true when it should be published.
    fn offer(&mut self, now: Instant, value: f64, threshold: f64) -> bool {
        self.sampled_at = Some(now);
        let publish = self.published.is_none_or(|last| (value - last).abs() >= threshold);
        if publish {
            self.published = Some(value);
        }
        publish
    }
}

/// One metric over an aggregation window.
#[derive(Debug, Clone, Copy)]
struct Agg {
    min: f64,
    max: f64,
    sum: f64,
    n: u32,
}

impl Agg {
    fn add(a: Option<Agg>, v: f64) -> Agg {
        match a {
            None => Agg { min: v, max: v, sum: v, n: 1 },
            Some(a) => Agg { min: a.min.min(v), max: a.max.max(v), sum: a.sum + v, n: a.n + 1 },
        }
    }
}

/// The longest first window of aggregation after the agent starts.
const FIRST_WINDOW_S: u32 = 300;

/// Aggregation (`telemetry.window_s` > 0): samples gathered over the window, and the means last
/// sent (the deadband's reference).
#[derive(Default)]
struct Window {
    started: Option<Instant>,
    aggs: BTreeMap<String, Agg>,
    sent: BTreeMap<String, f64>,
}

/// Gates samples and keeps the retained view: the latest published value of every enabled
/// metric, each with the time it was sampled.
#[derive(Default)]
pub struct Sampler {
    cpu: Gate,
    memory: Gate,
    disk: Gate,
    disk_published: BTreeMap<String, f64>,
    view: Telemetry,
    window: Window,
}

impl Sampler {
    /// Called about once a second; when any metric is due and moved, returns the whole view
    /// (the retained message), not only what moved. With a window, returns one aggregated
    /// message at the end of each window in which a mean moved past its threshold.
    pub fn tick(&mut self, now: Instant, cfg: &TelemetryCfg, probe: &mut dyn Probe) -> Option<Telemetry> {
        if cfg.window_s > 0 {
            return self.aggregate(now, cfg, probe);
        }
        self.window = Window::default();
        self.view.window_s = None;
        self.view.range.clear();
        let ts = time::now();
        let mut moved = false;
        let view = &mut self.view;
        if cfg.cpu.enabled && self.cpu.due(now, cfg.cpu.interval_s) {
            let v = probe.cpu();
            if self.cpu.offer(now, v, cfg.cpu.threshold) {
                view.cpu = Some(v);
                view.at.insert("cpu".into(), ts.clone());
                moved = true;
            }
        }
        if cfg.memory.enabled && self.memory.due(now, cfg.memory.interval_s) {
            let v = probe.memory();
            if self.memory.offer(now, v, cfg.memory.threshold) {
                view.memory = Some(v);
                view.at.insert("memory".into(), ts.clone());
                moved = true;
            }
        }
        if cfg.disk.enabled && self.disk.due(now, cfg.disk.interval_s) {
            self.disk.sampled_at = Some(now);
            for mount in &cfg.disk.mounts {
                let Some(v) = probe.disk(mount) else { continue };
                let last = self.disk_published.get(mount).copied();
                if last.is_none_or(|l| (v - l).abs() >= cfg.disk.threshold) {
                    self.disk_published.insert(mount.clone(), v);
                    view.disk.insert(mount.clone(), v);
                    view.at.insert(format!("disk:{mount}"), ts.clone());
                    moved = true;
                }
            }
        }
        // What is no longer enabled leaves the view (and is sampled afresh when enabled again).
        if !cfg.cpu.enabled {
            view.cpu = None;
            self.cpu = Gate::default();
        }
        if !cfg.memory.enabled {
            view.memory = None;
            self.memory = Gate::default();
        }
        let mounts: &[String] = if cfg.disk.enabled { &cfg.disk.mounts } else { &[] };
        view.disk.retain(|m, _| mounts.contains(m));
        self.disk_published.retain(|m, _| mounts.contains(m));
        if !cfg.disk.enabled {
            self.disk = Gate::default();
        }
        let (cpu, memory) = (view.cpu.is_some(), view.memory.is_some());
        let disk: Vec<String> = view.disk.keys().map(|m| format!("disk:{m}")).collect();
        view.at.retain(|k, _| (k == "cpu" && cpu) || (k == "memory" && memory) || disk.contains(k));
        if !moved {
            return None;
        }
        view.v = CONTRACT_VERSION;
        view.ts = ts;
        Some(view.clone())
    }

    fn aggregate(&mut self, now: Instant, cfg: &TelemetryCfg, probe: &mut dyn Probe) -> Option<Telemetry> {
        let w = &mut self.window;
        let started = *w.started.get_or_insert(now);
        let mut sample = |key: String, v: f64| {
            let a = w.aggs.get(&key).copied();
            w.aggs.insert(key, Agg::add(a, v));
        };
        if cfg.cpu.enabled && self.cpu.due(now, cfg.cpu.interval_s) {
            self.cpu.sampled_at = Some(now);
            sample("cpu".into(), probe.cpu());
        }
        if cfg.memory.enabled && self.memory.due(now, cfg.memory.interval_s) {
            self.memory.sampled_at = Some(now);
            sample("memory".into(), probe.memory());
        }
        if cfg.disk.enabled && self.disk.due(now, cfg.disk.interval_s) {
            self.disk.sampled_at = Some(now);
            for mount in &cfg.disk.mounts {
                if let Some(v) = probe.disk(mount) {
                    sample(format!("disk:{mount}"), v);
                }
            }
        }
        // The first window after a start is at most five minutes, so a device that (re)started
        // reports soon; the deadband then measures every later window against it.
        let window_s = if w.sent.is_empty() { cfg.window_s.min(FIRST_WINDOW_S) } else { cfg.window_s };
        if now.duration_since(started) + Duration::from_millis(50) < Duration::from_secs(window_s.into()) {
            return None;
        }
        let aggs = std::mem::take(&mut w.aggs);
        w.started = Some(now);
        let threshold = |key: &str| match key {
            "cpu" => cfg.cpu.threshold,
            "memory" => cfg.memory.threshold,
            _ => cfg.disk.threshold,
        };
        let mean = |a: &Agg| round(a.sum / f64::from(a.n.max(1)));
        let moved = aggs.iter().any(|(k, a)| w.sent.get(k).is_none_or(|last| (mean(a) - last).abs() >= threshold(k)))
            || w.sent.keys().any(|k| !aggs.contains_key(k));
        if !moved || aggs.is_empty() {
            return None;
        }
        let ts = time::now();
        let mut view = Telemetry { v: CONTRACT_VERSION, ts, window_s: Some(window_s), ..Telemetry::default() };
        w.sent.clear();
        for (k, a) in &aggs {
            let m = mean(a);
            w.sent.insert(k.clone(), m);
            match k.as_str() {
                "cpu" => view.cpu = Some(m),
                "memory" => view.memory = Some(m),
                other => {
                    view.disk.insert(other.trim_start_matches("disk:").to_owned(), m);
                }
            }
            // No `at`: every value is of the window that ends at `ts`.
            view.range.insert(k.clone(), [a.min, a.max]);
        }
        self.view = view.clone();
        Some(view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Script {
        cpu: Vec<f64>,
        calls: usize,
    }

    impl Probe for Script {
        fn cpu(&mut self) -> f64 {
            self.calls += 1;
            self.cpu.remove(0)
        }
        fn memory(&mut self) -> f64 {
            50.0
        }
        fn disk(&mut self, mount: &str) -> Option<f64> {
            (mount == "/").then_some(40.0)
        }
    }

    fn cfg() -> TelemetryCfg {
        let mut c = TelemetryCfg::default();
        c.cpu.interval_s = 2;
        c.cpu.threshold = 5.0;
        c.memory.enabled = false;
        c.disk.mounts = vec!["/".into(), "/missing".into()];
        c
    }

    #[test]
    fn interval_and_threshold_gate_publishing() {
        let t0 = Instant::now();
        let mut s = Sampler::default();
        let mut p = Script { cpu: vec![10.0, 12.0, 20.0], calls: 0 };
        let first = s.tick(t0, &cfg(), &mut p).unwrap();
        assert_eq!(first.cpu, Some(10.0));
        assert_eq!(first.disk.get("/"), Some(&40.0));
        assert!(!first.disk.contains_key("/missing"));
        assert_eq!(first.memory, None);
        // Not due yet: no sample taken.
        assert!(s.tick(t0 + Duration::from_secs(1), &cfg(), &mut p).is_none());
        assert_eq!(p.calls, 1);
        // Due, but moved less than the threshold.
        assert!(s.tick(t0 + Duration::from_secs(2), &cfg(), &mut p).is_none());
        // Moved 10 points from the last *published* value.
        let third = s.tick(t0 + Duration::from_secs(4), &cfg(), &mut p).unwrap();
        assert_eq!(third.cpu, Some(20.0));
    }

    #[test]
    fn retained_view_keeps_every_enabled_metric_after_a_cpu_only_sample() {
        let t0 = Instant::now();
        let mut c = cfg();
        c.memory.enabled = true;
        c.memory.interval_s = 60;
        c.disk.interval_s = 60;
        c.cpu.threshold = 0.0;
        let mut s = Sampler::default();
        let mut p = Script { cpu: vec![10.0, 30.0], calls: 0 };
        let first = s.tick(t0, &c, &mut p).unwrap();
        assert_eq!((first.cpu, first.memory, first.disk.get("/")), (Some(10.0), Some(50.0), Some(&40.0)));
        // Only the CPU is due now; the message still carries memory and disk, with their own times.
        let second = s.tick(t0 + Duration::from_secs(2), &c, &mut p).unwrap();
        assert_eq!((second.cpu, second.memory, second.disk.get("/")), (Some(30.0), Some(50.0), Some(&40.0)));
        assert_eq!(second.at.keys().collect::<Vec<_>>(), ["cpu", "disk:/", "memory"]);
        assert_eq!(second.at["memory"], first.at["memory"]);
        // A metric switched off leaves the view.
        c.memory.enabled = false;
        p.cpu.push(60.0);
        let third = s.tick(t0 + Duration::from_secs(4), &c, &mut p).unwrap();
        assert_eq!(third.memory, None);
        assert!(!third.at.contains_key("memory"));
    }

    #[test]
    fn a_window_sends_one_aggregate_and_the_deadband_holds_back_a_quiet_one() {
        let t0 = Instant::now();
        let mut c = cfg();
        c.window_s = 10;
        c.disk.interval_s = 10;
        let mut s = Sampler::default();
        let mut p = Script { cpu: vec![10.0, 20.0, 30.0, 40.0, 50.0, 30.0, 29.0, 30.0, 32.0, 28.0, 30.0], calls: 0 };
        let mut sent = Vec::new();
        for sec in 0..=20 {
            if let Some(t) = s.tick(t0 + Duration::from_secs(sec), &c, &mut p) {
                sent.push((sec, t));
            }
        }
        assert_eq!(sent.len(), 1, "the second window's mean moved less than 5 points: {sent:?}");
        let (at, t) = &sent[0];
        assert_eq!(*at, 10);
        assert_eq!((t.cpu, t.window_s, t.range["cpu"]), (Some(30.0), Some(10), [10.0, 50.0]));
        assert_eq!(t.disk["/"], 40.0);
        // A move beyond the deadband is sent at the end of its window.
        let mut p = Script { cpu: vec![90.0; 6], calls: 0 };
        let t = (21..=30).find_map(|sec| s.tick(t0 + Duration::from_secs(sec), &c, &mut p)).unwrap();
        assert_eq!(t.cpu, Some(90.0));
    }

    #[test]
    fn the_first_window_after_a_start_is_five_minutes_then_the_configured_one() {
        let t0 = Instant::now();
        let mut c = cfg();
        c.window_s = 3600;
        c.cpu.interval_s = 60;
        let mut s = Sampler::default();
        let mut p = Script { cpu: vec![20.0; 70], calls: 0 };
        let sent: Vec<(u64, Telemetry)> = (0..=3900)
            .step_by(10)
            .filter_map(|sec| s.tick(t0 + Duration::from_secs(sec), &c, &mut p).map(|t| (sec, t)))
            .collect();
        assert_eq!(sent.len(), 1, "the hour after the first window held still: {sent:?}");
        assert_eq!((sent[0].0, sent[0].1.window_s, sent[0].1.cpu), (300, Some(300), Some(20.0)));
        let mut p = Script { cpu: vec![80.0; 80], calls: 0 };
        let t = (3910..=7600).step_by(10).find_map(|sec| s.tick(t0 + Duration::from_secs(sec), &c, &mut p)).unwrap();
        assert_eq!((t.window_s, t.cpu.map(|c| c > 25.0)), (Some(3600), Some(true)));
    }

    #[test]
    fn disabled_metrics_are_never_sampled() {
        let mut c = cfg();
        c.cpu.enabled = false;
        c.disk.enabled = false;
        let mut p = Script { cpu: vec![], calls: 0 };
        assert!(Sampler::default().tick(Instant::now(), &c, &mut p).is_none());
    }

    #[test]
    fn system_probe_reads_real_values() {
        let mut p = SystemProbe::new();
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let cpu = p.cpu();
        assert!((0.0..=100.0).contains(&cpu), "{cpu}");
        let mem = p.memory();
        assert!(mem > 0.0 && mem <= 100.0, "{mem}");
        assert!(p.disk("/").is_some());
        assert!(p.disk("/definitely/not/here").is_none());
    }
}
