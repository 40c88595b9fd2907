//! When the retained set has been read to its end — without relying on delivery order, which
//! clustered brokers do not keep (EMQX dispatches retained messages from a separate, rate-limited
//! worker, so a marker published after the SUBSCRIBE can come back before them).
//!
//! Two facts make the read checkable instead of hoped for:
//! - every agent publishes, on every connect, four core facts: `status`, `meta`, `cfg`,
//!   `state/packages`; a device is complete once all four are in;
//! - the fleet index (`PREFIX/index`, retained, written by consoles after a read) names the
//!   devices the last read found, so this read knows whom to wait for.
//!
//! The index is itself a retained message, as late as any other; so the console also remembers,
//! per broker, what its last read found (`$XDG_CACHE_HOME/debfleet/`). A console that has read
//! this broker before waits for the index and for every device it remembers; one that has not
//! waits for the index only for a quiet period after its marker (a fleet nobody has read yet).
//!
//! The read ends when the console's own marker is back, the index is in (or not expected) and
//! every device named, remembered or seen is complete — or at the deadline, with the incomplete
//! ones named. Pure: the session feeds it messages and the time.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use debfleet_protocol::{DeviceId, Topic, Topics};
use serde::{Deserialize, Serialize};

/// How long after the marker a fleet without an index waits for one.
pub const NO_INDEX_QUIET: Duration = Duration::from_millis(500);
/// How long a console that remembers the fleet waits for a late index once every device it
/// remembers is complete (the index may only add devices; a console that may not write it
/// would otherwise wait for it every time).
pub const REMEMBERED_INDEX_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    pub v: u32,
    pub devices: BTreeSet<DeviceId>,
    /// The desired-state records (`group/G`, `device/ID`) the last read of them found, so a read
    /// that includes them knows whom to wait for (a console writing a record reads it first).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub desired: BTreeSet<String>,
}

const CORE: usize = 4;

#[derive(Default)]
pub struct ReadState {
    marker_at: Option<Instant>,
    index: Option<BTreeSet<DeviceId>>,
    /// The index's desired-state records.
    index_desired: BTreeSet<String>,
    /// Whether this read includes the desired-state records (then it waits for those the
    /// index names, and writes back those it found).
    reading_desired: bool,
    desired: BTreeSet<String>,
    /// What this console's last read of the broker found (None: it has not read it before).
    remembered: Option<BTreeSet<DeviceId>>,
    /// Core facts seen per device (a bit each).
    facts: BTreeMap<DeviceId, u8>,
}

impl ReadState {
    pub fn remembering(remembered: Option<BTreeSet<DeviceId>>) -> ReadState {
        ReadState { remembered, ..ReadState::default() }
    }

    /// This read includes the desired-state records.
    pub fn with_desired(self) -> ReadState {
        ReadState { reading_desired: true, ..self }
    }

    pub fn marker(&mut self, now: Instant) {
        self.marker_at.get_or_insert(now);
    }

    pub fn marker_seen(&self) -> bool {
        self.marker_at.is_some()
    }

    pub fn index(&mut self, payload: &[u8]) {
        // An unreadable (or deleted) index is no index.
        let index = serde_json::from_slice::<Index>(payload).ok();
        self.index_desired = index.as_ref().map(|i| i.desired.clone()).unwrap_or_default();
        self.index = Some(index.map(|i| i.devices).unwrap_or_default());
    }

    pub fn message(&mut self, topics: &Topics, topic: &str, payload: &[u8]) {
        let bit = match topics.parse(topic) {
            Ok(Topic::DesiredDevice(d)) if !payload.is_empty() => {
                self.desired.insert(format!("device/{d}"));
                return;
            }
            Ok(Topic::DesiredGroup(g)) if !payload.is_empty() => {
                self.desired.insert(format!("group/{g}"));
                return;
            }
            Ok(Topic::Status(_)) => 1,
            Ok(Topic::Meta(_)) => 2,
            Ok(Topic::Cfg(_)) => 4,
            Ok(Topic::StatePackages(_)) => 8,
            _ => return,
        };
        if payload.is_empty() {
            return;
        }
        if let Ok(t) = topics.parse(topic) {
            if let Some(d) = t.device() {
                *self.facts.entry(d.clone()).or_default() |= bit;
            }
        }
    }

    /// Devices named by the index or seen, whose core facts are not all in yet.
    pub fn incomplete(&self) -> Vec<DeviceId> {
        let named = self.index.iter().flatten().chain(self.remembered.iter().flatten());
        let seen = self.facts.keys();
        let all: BTreeSet<&DeviceId> = named.chain(seen).collect();
        all.into_iter().filter(|d| self.facts.get(*d).map_or(0, |b| b.count_ones() as usize) < CORE).cloned().collect()
    }

    pub fn done(&self, now: Instant) -> bool {
        let Some(marker) = self.marker_at else { return false };
        let waited = now.duration_since(marker);
        let index_settled = self.index.is_some()
            || (self.remembered.is_none() && waited >= NO_INDEX_QUIET)
            || (self.remembered.is_some() && waited >= REMEMBERED_INDEX_WAIT);
        index_settled && self.incomplete().is_empty() && self.missing_desired().is_empty()
    }

    /// Desired-state records the index names that have not arrived (when this read includes
    /// them).
    pub fn missing_desired(&self) -> Vec<String> {
        if !self.reading_desired {
            return Vec::new();
        }
        self.index_desired.difference(&self.desired).cloned().collect()
    }

    /// When to look again if nothing arrives (the no-index quiet period ending).
    pub fn next_check(&self) -> Option<Instant> {
        match (self.marker_at, &self.index, &self.remembered) {
            (Some(m), None, None) => Some(m + NO_INDEX_QUIET),
            (Some(m), None, Some(_)) => Some(m + REMEMBERED_INDEX_WAIT),
            _ => None,
        }
    }

    /// The devices found, to remember for the next read.
    pub fn found(&self) -> BTreeSet<DeviceId> {
        self.facts.keys().cloned().collect()
    }

    /// The index after this read: the devices found, and the desired-state records found (or,
    /// when this read did not include them, those the index named).
    pub fn found_index(&self) -> Index {
        let desired = if self.reading_desired { self.desired.clone() } else { self.index_desired.clone() };
        Index { v: debfleet_protocol::CONTRACT_VERSION, devices: self.facts.keys().cloned().collect(), desired }
    }

    /// The index to write back when what was found differs from the one read.
    pub fn new_index(&self) -> Option<Index> {
        let found = self.found_index();
        let same = self.index.as_ref() == Some(&found.devices) && self.index_desired == found.desired;
        (!same).then_some(found)
    }
}

/// Where this console remembers what it found on a broker: `$XDG_CACHE_HOME/debfleet/` (or
/// `~/.cache/debfleet/`), one file per broker and prefix. None without a home.
pub fn memory_path(broker_url: &str, prefix: &str) -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))?;
    let key: String = format!("{broker_url} {prefix}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' })
        .collect();
    Some(base.join("debfleet").join(format!("fleet-{key}.json")))
}

pub fn recall(path: &std::path::Path) -> Option<BTreeSet<DeviceId>> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice::<Index>(&bytes).ok().map(|i| i.devices)
}

/// Best effort: a console that cannot write its cache only waits less wisely next time.
pub fn remember(path: &std::path::Path, devices: &BTreeSet<DeviceId>) {
    let index = Index { v: debfleet_protocol::CONTRACT_VERSION, devices: devices.clone(), desired: BTreeSet::new() };
    if let (Some(dir), Ok(bytes)) = (path.parent(), serde_json::to_vec(&index)) {
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        let _ = std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(&tmp, bytes))
            .and_then(|_| std::fs::rename(&tmp, path));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core(s: &mut ReadState, t: &Topics, dev: &str) {
        for f in ["status", "meta", "cfg", "state/packages"] {
            s.message(t, &format!("debfleet/device/{dev}/{f}"), b"{}");
        }
    }

    #[test]
    fn a_marker_that_overtakes_the_retained_messages_does_not_end_the_read() {
        let t = Topics::default();
        let t0 = Instant::now();
        let mut s = ReadState::default();
        s.index(br#"{"v":1,"devices":["a","b"]}"#);
        s.marker(t0);
        assert!(!s.done(t0), "a and b not in yet");
        core(&mut s, &t, "a");
        s.message(&t, "debfleet/device/b/status", b"{}");
        assert_eq!(s.incomplete(), [DeviceId::new("b").unwrap()]);
        assert!(!s.done(t0 + Duration::from_secs(5)));
        core(&mut s, &t, "b");
        assert!(s.done(t0));
        assert_eq!(s.new_index(), None);
    }

    #[test]
    fn without_an_index_the_read_waits_a_quiet_period_and_then_writes_one() {
        let t = Topics::default();
        let t0 = Instant::now();
        let mut s = ReadState::default();
        s.marker(t0);
        core(&mut s, &t, "a");
        assert!(!s.done(t0));
        assert_eq!(s.next_check(), Some(t0 + NO_INDEX_QUIET));
        assert!(s.done(t0 + NO_INDEX_QUIET));
        let idx = s.new_index().unwrap();
        assert_eq!(idx.devices.into_iter().collect::<Vec<_>>(), [DeviceId::new("a").unwrap()]);
    }

    #[test]
    fn a_console_that_read_the_broker_before_waits_for_the_late_index_and_what_it_remembers() {
        let t = Topics::default();
        let t0 = Instant::now();
        let remembered = [DeviceId::new("a").unwrap()].into_iter().collect();
        let mut s = ReadState::remembering(Some(remembered));
        s.marker(t0);
        assert_eq!(s.next_check(), Some(t0 + REMEMBERED_INDEX_WAIT));
        assert!(!s.done(t0 + Duration::from_secs(5)), "a is late, not absent");
        core(&mut s, &t, "a");
        assert!(!s.done(t0 + Duration::from_secs(1)), "the index is still to come");
        s.index(br#"{"v":1,"devices":["a"]}"#);
        assert!(s.done(t0));
        // A console that may not write the index still ends, once what it remembers is in.
        let remembered = [DeviceId::new("a").unwrap()].into_iter().collect();
        let mut s = ReadState::remembering(Some(remembered));
        s.marker(t0);
        core(&mut s, &t, "a");
        assert!(s.done(t0 + REMEMBERED_INDEX_WAIT));
    }

    #[test]
    fn a_read_of_desired_state_waits_for_the_records_the_index_names() {
        let t = Topics::default();
        let t0 = Instant::now();
        let mut s = ReadState::default().with_desired();
        s.index(br#"{"v":1,"devices":["a"],"desired":["group/lab","device/a"]}"#);
        s.marker(t0);
        core(&mut s, &t, "a");
        s.message(&t, "debfleet/desired/group/lab", b"{}");
        assert!(!s.done(t0 + Duration::from_secs(5)), "device/a's record is late");
        assert_eq!(s.missing_desired(), ["device/a"]);
        s.message(&t, "debfleet/desired/device/a", b"{}");
        assert!(s.done(t0));
        assert_eq!(s.new_index(), None);
        // A read without them neither waits for them nor drops them from the index.
        let mut s = ReadState::default();
        s.index(br#"{"v":1,"devices":["a"],"desired":["group/lab"]}"#);
        s.marker(t0);
        core(&mut s, &t, "a");
        assert!(s.done(t0));
        assert_eq!(s.found_index().desired.into_iter().collect::<Vec<_>>(), ["group/lab"]);
    }

    #[test]
    fn a_device_the_index_does_not_name_yet_still_counts() {
        let t = Topics::default();
        let t0 = Instant::now();
        let mut s = ReadState::default();
        s.index(br#"{"v":1,"devices":["a"]}"#);
        s.marker(t0);
        core(&mut s, &t, "a");
        s.message(&t, "debfleet/device/new/status", b"{}");
        assert!(!s.done(t0));
        core(&mut s, &t, "new");
        assert!(s.done(t0));
        assert!(s.new_index().is_some());
    }
}
