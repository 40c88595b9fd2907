//! What the monitor shows, kept apart from the terminal: the fleet as the broker tells it, the
//! merged log, message rates per topic, and the operator's place (selection, marks, group
//! filter, log scroll). Every key and every message is a method here; the view only reads.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use debfleet_protocol::{DeviceId, GroupName, LogBatch, Topic, Topics};

use crate::fleet::{Device, Fleet};

/// Log lines kept for scrolling back.
pub const MAX_LOG_LINES: usize = 2000;
/// Rates are counted over this window.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    pub ts: String,
    pub device: DeviceId,
    pub level: String,
    pub target: String,
    pub msg: String,
}

/// A keypress the monitor understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Up,
    Down,
    /// Mark or unmark the selected device for the merged log.
    Mark,
    /// Next group filter (all devices, then each group in turn).
    Group,
    ScrollUp,
    ScrollDown,
    /// Back to the newest log lines.
    Follow,
    Quit,
}

pub struct Model {
    pub fleet: Fleet,
    pub topics: Topics,
    pub group: Option<GroupName>,
    pub selected: Option<DeviceId>,
    pub marked: BTreeSet<DeviceId>,
    pub log: VecDeque<LogEntry>,
    /// Lines scrolled back from the newest (0: following).
    pub scroll: usize,
    /// Arrival times per topic pattern (device and operation ids as `+`).
    arrivals: BTreeMap<String, VecDeque<Instant>>,
    pub received: u64,
    pub invalid: u64,
}

impl Model {
    pub fn new(topics: Topics, group: Option<GroupName>) -> Model {
        Model {
            fleet: Fleet::default(),
            topics,
            group,
            selected: None,
            marked: BTreeSet::new(),
            log: VecDeque::new(),
            scroll: 0,
            arrivals: BTreeMap::new(),
            received: 0,
            invalid: 0,
        }
    }

    /// One message from the broker.
    pub fn message(&mut self, topic: &str, payload: &[u8], now: Instant) {
        self.received += 1;
        if let crate::fleet::Change::Invalid(_) = self.fleet.apply(&self.topics, topic, payload) {
            self.invalid += 1;
        }
        let parsed = self.topics.parse(topic).ok();
        let pattern = parsed.as_ref().map_or_else(|| "(other)".to_owned(), |t| self.pattern(t));
        let q = self.arrivals.entry(pattern).or_default();
        q.push_back(now);
        // A flood does not grow memory: the window holds at most this many per pattern.
        while q.len() > 100_000 {
            q.pop_front();
        }
        let batch = match &parsed {
            Some(Topic::Logs(d)) => Some((d.clone(), None)),
            Some(Topic::Component(d, c, debfleet_protocol::topics::ComponentFact::Logs)) => {
                Some((d.clone(), Some(c.to_string())))
            }
            _ => None,
        };
        if let Some((device, _)) = batch {
            if let Ok(b) = serde_json::from_slice::<LogBatch>(payload) {
                for l in b.lines {
                    self.push_log(LogEntry {
                        ts: l.ts,
                        device: device.clone(),
                        level: l.level,
                        target: l.target,
                        msg: l.msg,
                    });
                }
                if b.dropped > 0 {
                    let msg = format!("({} lines dropped by the device's rate limit)", b.dropped);
                    self.push_log(LogEntry { ts: b.ts, device, level: "warn".into(), target: "debfleet".into(), msg });
                }
            }
        }
        // Only a message about the selected device can take it out of view (or none is selected
        // yet): the rest never make the selection look at the whole fleet.
        let about_selected =
            parsed.as_ref().and_then(|t| t.device()).is_some_and(|d| Some(d) == self.selected.as_ref());
        if self.selected.is_none() || about_selected {
            let visible = self.visible();
            if !self.selected.as_ref().is_some_and(|s| visible.contains(&s)) {
                self.selected = visible.first().map(|d| (*d).clone());
            }
        }
    }

    fn push_log(&mut self, e: LogEntry) {
        // Scrolled back, the view stays on the same lines as new ones arrive (counted in the
        // lines shown: the log's devices).
        if self.scroll > 0 && self.log_devices().contains(&e.device) {
            self.scroll += 1;
        }
        self.log.push_back(e);
        if self.log.len() > MAX_LOG_LINES {
            self.log.pop_front();
        }
        if self.scroll > 0 {
            self.scroll = self.scroll.min(self.shown_lines().saturating_sub(1));
        }
    }

    fn shown_lines(&self) -> usize {
        let who = self.log_devices();
        self.log.iter().filter(|e| who.contains(&e.device)).count()
    }

    fn pattern(&self, t: &Topic) -> String {
        let p = self.topics.prefix();
        match t {
            Topic::Op(..) => format!("{p}/device/+/op/+"),
            Topic::Session(_, _, dir) => format!("{p}/session/+/+/{}", dir.as_str()),
            Topic::Component(_, c, fact) => format!("{p}/device/+/components/{c}/{}", fact.as_str()),
            Topic::DeviceCmd(_, verb) => format!("{p}/device/+/cmd/{verb}"),
            Topic::GroupCmd(g, verb) => format!("{p}/group/{g}/cmd/{verb}"),
            other => {
                let s = self.topics.name(other);
                match other.device() {
                    // The device's own level, never a match inside another (a device "dev").
                    Some(d) => {
                        // The level after `device/` (or `session/`) past the prefix.
                        let skip = p.split('/').count();
                        let mut levels: Vec<&str> = s.split('/').collect();
                        if let Some(i) = (skip + 1..levels.len())
                            .find(|&i| levels[i] == d.as_str() && matches!(levels[i - 1], "device" | "session"))
                        {
                            levels[i] = "+";
                        }
                        levels.join("/")
                    }
                    None => s,
                }
            }
        }
    }

    /// Messages a second per topic pattern over the last [`RATE_WINDOW`], busiest first.
    pub fn rates(&mut self, now: Instant) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        self.arrivals.retain(|pattern, q| {
            while q.front().is_some_and(|t| now.duration_since(*t) > RATE_WINDOW) {
                q.pop_front();
            }
            if !q.is_empty() {
                out.push((pattern.clone(), q.len() as f64 / RATE_WINDOW.as_secs_f64()));
            }
            !q.is_empty()
        });
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out
    }

    /// The devices the filter lets through, in id order.
    pub fn visible(&self) -> Vec<&DeviceId> {
        self.fleet
            .devices
            .iter()
            .filter(|(_, d)| d.meta.is_some() || d.status.is_some())
            .filter(|(_, d)| self.group.as_ref().is_none_or(|g| d.groups().contains(g)))
            .map(|(id, _)| id)
            .collect()
    }

    pub fn device(&self, id: &DeviceId) -> Option<&Device> {
        self.fleet.devices.get(id)
    }

    /// Whose lines the log shows: the marked devices, or (none marked) every visible one.
    pub fn log_devices(&self) -> BTreeSet<DeviceId> {
        let visible: BTreeSet<DeviceId> = self.visible().into_iter().cloned().collect();
        if self.marked.is_empty() {
            visible
        } else {
            self.marked.intersection(&visible).cloned().collect()
        }
    }

    /// The log lines shown, oldest first: `height` of them ending `scroll` lines back.
    pub fn log_view(&self, height: usize) -> Vec<&LogEntry> {
        let who = self.log_devices();
        let lines: Vec<&LogEntry> = self.log.iter().filter(|e| who.contains(&e.device)).collect();
        let end = lines.len().saturating_sub(self.scroll.min(lines.len()));
        let start = end.saturating_sub(height);
        lines[start..end].to_vec()
    }

    /// Every group a known device is in.
    pub fn groups(&self) -> Vec<GroupName> {
        let set: BTreeSet<GroupName> = self.fleet.devices.values().flat_map(|d| d.groups().iter().cloned()).collect();
        set.into_iter().collect()
    }

    /// A key; false when it means quit.
    pub fn key(&mut self, k: Key) -> bool {
        let visible: Vec<DeviceId> = self.visible().into_iter().cloned().collect();
        let at = self.selected.as_ref().and_then(|s| visible.iter().position(|d| d == s));
        match k {
            Key::Quit => return false,
            Key::Up => self.selected = at.map(|i| visible[i.saturating_sub(1)].clone()).or(visible.first().cloned()),
            Key::Down => {
                self.selected = at.map(|i| visible[(i + 1).min(visible.len() - 1)].clone()).or(visible.first().cloned())
            }
            Key::Mark => {
                if let Some(s) = &self.selected {
                    if !self.marked.remove(s) {
                        self.marked.insert(s.clone());
                    }
                }
            }
            Key::Group => {
                let groups = self.groups();
                self.group = match &self.group {
                    None => groups.first().cloned(),
                    Some(g) => groups.iter().skip_while(|x| *x != g).nth(1).cloned(),
                };
                let visible = self.visible();
                if !self.selected.as_ref().is_some_and(|s| visible.contains(&s)) {
                    self.selected = visible.first().map(|d| (*d).clone());
                }
            }
            // At least the oldest line stays in view.
            Key::ScrollUp => self.scroll = (self.scroll + 5).min(self.shown_lines().saturating_sub(1)),
            Key::ScrollDown => self.scroll = self.scroll.saturating_sub(5),
            Key::Follow => self.scroll = 0,
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta(id: &str, groups: &[&str]) -> Vec<u8> {
        serde_json::to_vec(&json!({"v": 1, "device_id": id, "agent_version": "0.1.0", "hostname": id,
            "os": {"id": "debian", "version_id": "12", "pretty_name": "Debian"}, "arch": "amd64", "kernel": "6.1",
            "boot_id": "b", "groups": groups, "labels": {}, "commands": ["ping"]}))
        .unwrap()
    }

    #[test]
    fn selection_groups_marks_logs_and_rates() {
        let mut m = Model::new(Topics::default(), None);
        let now = Instant::now();
        for (id, g) in [("a-1", "alpha"), ("b-1", "beta"), ("a-2", "alpha")] {
            m.message(&format!("debfleet/device/{id}/meta"), &meta(id, &[g]), now);
        }
        let ids = |m: &Model| m.visible().into_iter().map(|d| d.to_string()).collect::<Vec<_>>();
        assert_eq!(ids(&m), ["a-1", "a-2", "b-1"], "{}", m.invalid);
        assert_eq!(m.selected.as_ref().unwrap().as_str(), "a-1");
        m.key(Key::Down);
        m.key(Key::Down);
        m.key(Key::Down);
        assert_eq!(m.selected.as_ref().unwrap().as_str(), "b-1", "stops at the end");
        m.key(Key::Group);
        assert_eq!(ids(&m), ["a-1", "a-2"]);
        assert_eq!(m.selected.as_ref().unwrap().as_str(), "a-1", "the selection follows the filter");
        m.key(Key::Group);
        assert_eq!(ids(&m), ["b-1"]);
        m.key(Key::Group);
        assert_eq!(ids(&m).len(), 3, "back to all");

        let batch = |id: &str, msg: &str| {
            serde_json::to_vec(&json!({"v": 1, "ts": "2026-12-05T03:00:00.000Z", "lines": [{"ts": "2026-12-05T03:00:00.000Z", "level": "info", "target": "agent", "msg": msg}], "dropped": 0})).unwrap()
        };
        m.message("debfleet/device/a-1/logs", &batch("a-1", "one"), now);
        m.message("debfleet/device/b-1/logs", &batch("b-1", "two"), now);
        assert_eq!(m.log_view(10).len(), 2, "none marked: every visible device");
        assert_eq!(m.selected.as_ref().unwrap().as_str(), "b-1");
        m.key(Key::Up);
        m.key(Key::Up);
        m.key(Key::Mark);
        let v: Vec<&str> = m.log_view(10).iter().map(|e| e.msg.as_str()).collect();
        assert_eq!(v, ["one"]);
        // Scrolled back, new lines do not move the view.
        m.marked.clear();
        m.key(Key::ScrollUp);
        assert_eq!(m.scroll, 1);
        m.message("debfleet/device/a-1/logs", &batch("a-1", "three"), now);
        assert_eq!(m.log_view(1)[0].msg, "one");
        m.key(Key::Follow);
        assert_eq!(m.log_view(1)[0].msg, "three");

        let rates = m.rates(now);
        // Three of each in the window; equal rates in name order.
        assert_eq!(rates, [("debfleet/device/+/logs".to_owned(), 0.3), ("debfleet/device/+/meta".to_owned(), 0.3)]);
        assert!(m.rates(now + Duration::from_secs(11)).is_empty(), "the window moved on");
        // A device named like a topic level is replaced at its own level only.
        let online = json!({"v": 1, "state": "online", "since": "2026-12-05T03:00:00.000Z", "boot_id": "b"});
        m.message("debfleet/device/device/status", online.to_string().as_bytes(), now);
        assert!(m.rates(now).iter().any(|(p, _)| p == "debfleet/device/+/status"), "{:?}", m.rates(now));
        // Garbage is counted, not fatal.
        m.message("debfleet/device/a-1/status", b"{not json", now);
        assert_eq!(m.invalid, 1);
        assert!(!m.key(Key::Quit));
    }
}
