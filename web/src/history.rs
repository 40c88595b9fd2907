//! What the device page shows that the broker does not keep: telemetry over the last hours and
//! the latest log lines, per device, in memory. The broker retains only a device's latest sample
//! and no logs, so the server keeps them from the moment it starts following the fleet.
//!
//! Bounded: at most [`POINTS`] points (one per [`STEP_S`], the latest sample in each step wins) and
//! [`LOG_LINES`] lines of at most [`LOG_MSG_CHARS`] characters per device, about 6 KiB of points
//! (32 bytes each) and 6 KiB of lines at most; devices are those of the fleet (the console
//! forgets a device the broker no longer has).

use std::collections::{HashMap, VecDeque};

use serde::Serialize;

/// How far back the plots go.
pub const SPAN_S: i64 = 6 * 3600;
/// One point per step.
pub const STEP_S: i64 = 120;
pub const POINTS: usize = (SPAN_S / STEP_S) as usize;
pub const LOG_LINES: usize = 20;
pub const LOG_MSG_CHARS: usize = 240;

/// One moment of a device's telemetry; each value a percentage, absent when the device does not
/// send it. Disk is the fullest mount point's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// Unix seconds.
    pub t: i64,
    pub cpu: Option<f32>,
    pub memory: Option<f32>,
    pub disk: Option<f32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogRow {
    pub ts: String,
    pub level: String,
    pub target: String,
    pub msg: String,
}

impl LogRow {
    /// The line as kept: its message cut to [`LOG_MSG_CHARS`].
    pub fn new(ts: &str, level: &str, target: &str, msg: &str) -> LogRow {
        let cut = |s: &str, n: usize| match s.char_indices().nth(n) {
            Some((i, _)) => format!("{}…", &s[..i]),
            None => s.to_owned(),
        };
        LogRow { ts: cut(ts, 40), level: cut(level, 16), target: cut(target, 64), msg: cut(msg, LOG_MSG_CHARS) }
    }
}

#[derive(Default)]
struct Track {
    points: VecDeque<Point>,
    logs: VecDeque<LogRow>,
}

#[derive(Default)]
pub struct History {
    devices: HashMap<String, Track>,
}

impl History {
    /// Adds a sample taken at `t`; returns the point as it now stands (merged into the step's
    /// point when one exists), or `None` for a sample older than what is kept.
    pub fn sample(&mut self, device: &str, mut p: Point) -> Option<Point> {
        let track = self.devices.entry(device.to_owned()).or_default();
        if let Some(last) = track.points.back_mut() {
            if p.t < last.t {
                // Older than what is drawn (a retained sample seen again on a reconnect).
                return None;
            }
            if p.t.div_euclid(STEP_S) == last.t.div_euclid(STEP_S) {
                // The same step: the newest value of each metric, the others kept.
                last.t = p.t;
                last.cpu = p.cpu.or(last.cpu);
                last.memory = p.memory.or(last.memory);
                last.disk = p.disk.or(last.disk);
                return Some(*last);
            }
            // A metric not in this sample keeps its last value (samples carry every enabled one).
            p.cpu = p.cpu.or(last.cpu);
            p.memory = p.memory.or(last.memory);
            p.disk = p.disk.or(last.disk);
        }
        track.points.push_back(p);
        while track.points.len() > POINTS || track.points.front().is_some_and(|f| f.t < p.t - SPAN_S) {
            track.points.pop_front();
        }
        Some(p)
    }

    /// Adds a batch's lines (oldest first).
    pub fn log(&mut self, device: &str, lines: impl IntoIterator<Item = LogRow>) {
        let track = self.devices.entry(device.to_owned()).or_default();
        for l in lines {
            track.logs.push_back(l);
            if track.logs.len() > LOG_LINES {
                track.logs.pop_front();
            }
        }
    }

    /// The points of the last [`SPAN_S`] before `now`, oldest first.
    pub fn points(&self, device: &str, now: i64) -> Vec<Point> {
        self.devices
            .get(device)
            .map(|t| t.points.iter().filter(|p| p.t >= now - SPAN_S).copied().collect())
            .unwrap_or_default()
    }

    /// The latest lines, newest first.
    pub fn logs(&self, device: &str) -> Vec<LogRow> {
        self.devices.get(device).map(|t| t.logs.iter().rev().cloned().collect()).unwrap_or_default()
    }

    /// Forgets a device (its records are gone from the broker).
    pub fn forget(&mut self, device: &str) {
        self.devices.remove(device);
    }
}

/// Where a value taken at `t` goes in a plot whose right edge is `now`: x in seconds from the
/// left edge (`now - SPAN_S`), y = 100 - percent (SVG's y grows downwards).
pub fn place(t: i64, v: f32, now: i64) -> (i64, f32) {
    (t - (now - SPAN_S), 100.0 - v.clamp(0.0, 100.0))
}

/// One plot's line: SVG polyline points in a `0 0 SPAN_S 100` view (see [`place`]).
pub fn polyline(points: &[Point], now: i64, value: fn(&Point) -> Option<f32>) -> String {
    let mut out = String::new();
    for p in points {
        if let Some(v) = value(p) {
            if !out.is_empty() {
                out.push(' ');
            }
            let (x, y) = place(p.t, v, now);
            out.push_str(&format!("{x},{y:.1}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: i64, cpu: f32) -> Point {
        Point { t, cpu: Some(cpu), memory: None, disk: None }
    }

    #[test]
    fn one_point_per_step_and_the_span_is_bounded() {
        let mut h = History::default();
        let t0 = 1_000_000 * STEP_S;
        // Ten samples a step for twice the span.
        for i in 0..(2 * SPAN_S / STEP_S * 10) {
            h.sample("d", at(t0 + i * STEP_S / 10, (i % 100) as f32));
        }
        let now = t0 + 2 * SPAN_S;
        let points = h.points("d", now);
        assert!(points.len() <= POINTS && points.len() >= POINTS - 1, "{}", points.len());
        assert!(points.windows(2).all(|w| w[0].t.div_euclid(STEP_S) < w[1].t.div_euclid(STEP_S)));
        assert!(points[0].t >= now - SPAN_S);
        // The last sample of a step is the one kept.
        let last = *points.last().unwrap();
        assert_eq!(last.cpu, Some(((2 * SPAN_S / STEP_S * 10 - 1) % 100) as f32));
    }

    #[test]
    fn metrics_sent_apart_share_a_point_and_an_old_sample_is_not_drawn() {
        let mut h = History::default();
        let t = 1_000_000 * STEP_S;
        h.sample("d", at(t, 10.0));
        let p = h.sample("d", Point { t: t + 1, cpu: None, memory: Some(40.0), disk: Some(70.0) }).unwrap();
        assert_eq!((p.cpu, p.memory, p.disk), (Some(10.0), Some(40.0), Some(70.0)));
        // The next step carries the memory and disk on until they are sent again.
        let p = h.sample("d", at(t + STEP_S, 20.0)).unwrap();
        assert_eq!((p.cpu, p.memory, p.disk), (Some(20.0), Some(40.0), Some(70.0)));
        assert_eq!(h.sample("d", at(t - 3 * STEP_S, 99.0)), None);
        // Older than the last point, though in its step: not drawn over the newer value.
        assert_eq!(h.sample("d", at(t + STEP_S - 1, 99.0)), None);
        assert_eq!(h.points("d", t + STEP_S).len(), 2);
        assert_eq!(polyline(&h.points("d", t + STEP_S), t + STEP_S, |p| p.cpu), {
            let x0 = SPAN_S - STEP_S + 1;
            format!("{x0},90.0 {},80.0", SPAN_S)
        });
    }

    #[test]
    fn the_latest_lines_are_kept_cut_to_size() {
        let mut h = History::default();
        h.log("d", (0..50).map(|i| LogRow::new("ts", "warn", "agent", &format!("line {i}"))));
        let logs = h.logs("d");
        assert_eq!(logs.len(), LOG_LINES);
        assert_eq!(logs[0].msg, "line 49");
        assert_eq!(logs[LOG_LINES - 1].msg, "line 30");
        let long = LogRow::new("ts", "warn", "agent", &"é".repeat(1000));
        assert_eq!(long.msg.chars().count(), LOG_MSG_CHARS + 1);
        h.forget("d");
        assert!(h.logs("d").is_empty() && h.points("d", 0).is_empty());
    }
}
