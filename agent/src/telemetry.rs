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

#[derive(Default)]
pub struct Sampler {
    cpu: Gate,
    memory: Gate,
    disk: Gate,
    disk_published: BTreeMap<String, f64>,
}

impl Sampler {
    /// Called about once a second; returns a message when any metric is due and moved.
    pub fn tick(&mut self, now: Instant, cfg: &TelemetryCfg, probe: &mut dyn Probe) -> Option<Telemetry> {
        let mut msg =
            Telemetry { v: CONTRACT_VERSION, ts: time::now(), cpu: None, memory: None, disk: BTreeMap::new() };
        if cfg.cpu.enabled && self.cpu.due(now, cfg.cpu.interval_s) {
            let v = probe.cpu();
            if self.cpu.offer(now, v, cfg.cpu.threshold) {
                msg.cpu = Some(v);
            }
        }
        if cfg.memory.enabled && self.memory.due(now, cfg.memory.interval_s) {
            let v = probe.memory();
            if self.memory.offer(now, v, cfg.memory.threshold) {
                msg.memory = Some(v);
            }
        }
        if cfg.disk.enabled && self.disk.due(now, cfg.disk.interval_s) {
            self.disk.sampled_at = Some(now);
            for mount in &cfg.disk.mounts {
                let Some(v) = probe.disk(mount) else { continue };
                let last = self.disk_published.get(mount).copied();
                if last.is_none_or(|l| (v - l).abs() >= cfg.disk.threshold) {
                    self.disk_published.insert(mount.clone(), v);
                    msg.disk.insert(mount.clone(), v);
                }
            }
        }
        (msg.cpu.is_some() || msg.memory.is_some() || !msg.disk.is_empty()).then_some(msg)
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
