//! What the link carries: bytes sent and received today by priority class, against the data
//! budget; drops and reconnects; and which retained facts the broker holds from us, so a
//! reconnect into a kept session republishes only what changed. Shared by the sender task
//! (what it hands to the client), the connection task (what arrives, keepalives, connects) and
//! the core (decisions, the `state/link` report, persistence on its thread).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use debfleet_protocol::{time, ClassBytes, LinkState, TrafficClass, CONTRACT_VERSION};
use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;

pub use debfleet_mqtt::TCP_IP_OVERHEAD;

/// Telemetry may use this share of the daily budget, logs this one; the rest is kept for the
/// classes that always go.
const TELEMETRY_SHARE: f64 = 0.7;
const LOGS_SHARE: f64 = 0.9;

/// The day's counters, as kept on disk (`state_dir/link.json`) so a restart does not reset the
/// budget.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Day {
    day: String,
    classes: BTreeMap<TrafficClass, ClassBytes>,
    dropped: u64,
    connects: u64,
}

/// How often the day's counters are written while they change (a restart loses at most this
/// much of the day's count; an SD card is spared a write a minute).
const SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

#[derive(Debug, Default)]
struct Inner {
    today: Day,
    dirty: bool,
    saved_at: Option<std::time::Instant>,
    mqtt: u8,
    session_present: bool,
    /// Retained facts handed to the client on a kept session, by topic: the payload's hash.
    facts: HashMap<String, u64>,
    /// The command filters the kept session is subscribed to.
    subscribed: Vec<String>,
}

#[derive(Debug)]
pub struct Link {
    path: PathBuf,
    facts_path: PathBuf,
    inner: Mutex<Inner>,
}

/// A fact's identity for "unchanged": its payload without the top-level `ts` (when it was
/// read, not what it says).
pub fn hash(payload: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(serde_json::Value::Object(mut m)) => {
            m.remove("ts");
            serde_json::to_vec(&m).unwrap_or_default().hash(&mut h);
        }
        _ => payload.hash(&mut h),
    }
    h.finish()
}

/// What a kept session held when the agent last stopped cleanly.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Facts {
    facts: HashMap<String, u64>,
    subscribed: Vec<String>,
}

fn day_of(now_ms: i64) -> String {
    time::format_unix_ms(now_ms)[..10].to_owned()
}

impl Link {
    /// Loads today's counters, and the facts a kept session held if the previous run stopped
    /// cleanly (the file is removed at once: after a crash, what the client had not sent yet is
    /// unknown, so everything is published again).
    pub fn open(state_dir: &Path, now_ms: i64) -> Link {
        let path = state_dir.join("link.json");
        let facts_path = state_dir.join("link-facts.json");
        let mut inner = Inner::default();
        if let Some(d) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Day>(&b).ok()) {
            if d.day == day_of(now_ms) {
                inner.today = d;
            }
        }
        if inner.today.day.is_empty() {
            inner.today.day = day_of(now_ms);
        }
        if let Some(f) = std::fs::read(&facts_path).ok().and_then(|b| serde_json::from_slice::<Facts>(&b).ok()) {
            inner.facts = f.facts;
            inner.subscribed = f.subscribed;
        }
        let _ = std::fs::remove_file(&facts_path);
        Link { path, facts_path, inner: Mutex::new(inner) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn roll(inner: &mut Inner, now_ms: i64) {
        let day = day_of(now_ms);
        if inner.today.day != day {
            inner.today = Day { day, ..Day::default() };
            inner.dirty = true;
        }
    }

    /// An MQTT packet of `bytes` went out.
    pub fn sent(&self, class: TrafficClass, bytes: usize) {
        let mut i = self.lock();
        Self::roll(&mut i, time::now_unix_ms());
        i.today.classes.entry(class).or_default().sent += bytes as u64 + TCP_IP_OVERHEAD;
        i.dirty = true;
    }

    pub fn received(&self, class: TrafficClass, bytes: usize) {
        let mut i = self.lock();
        Self::roll(&mut i, time::now_unix_ms());
        i.today.classes.entry(class).or_default().received += bytes as u64 + TCP_IP_OVERHEAD;
        i.dirty = true;
    }

    pub fn dropped(&self, n: u64) {
        if n == 0 {
            return;
        }
        let mut i = self.lock();
        Self::roll(&mut i, time::now_unix_ms());
        i.today.dropped += n;
        i.dirty = true;
    }

    /// A connection was made. Without a kept session the broker has none of our subscriptions
    /// and nothing in flight: every fact is published again.
    pub fn connected(&self, mqtt: u8, session_present: bool) {
        let mut i = self.lock();
        Self::roll(&mut i, time::now_unix_ms());
        i.today.connects += 1;
        i.mqtt = mqtt;
        i.session_present = session_present;
        if !session_present {
            i.facts.clear();
            i.subscribed.clear();
        }
        i.dirty = true;
    }

    /// Bytes sent today, all classes.
    #[cfg(test)]
    pub fn sent_today(&self) -> u64 {
        self.lock().today.classes.values().map(|c| c.sent).sum()
    }

    /// Whether a message of `class` may go now under `budget` bytes a day (0: no budget).
    pub fn allows(&self, class: TrafficClass, budget: u64) -> bool {
        let share = match class {
            TrafficClass::Telemetry => TELEMETRY_SHARE,
            TrafficClass::Logs => LOGS_SHARE,
            _ => return true,
        };
        if budget == 0 {
            return true;
        }
        let mut i = self.lock();
        Self::roll(&mut i, time::now_unix_ms());
        let sent: u64 = i.today.classes.values().map(|c| c.sent).sum();
        (sent as f64) < budget as f64 * share
    }

    /// A retained fact was handed to the client: on a kept session it reaches the broker even
    /// across a reconnect (the client sends what is in flight again).
    pub fn handed(&self, topic: &str, payload: &[u8]) {
        let mut i = self.lock();
        if payload.is_empty() {
            i.facts.remove(topic);
        } else {
            i.facts.insert(topic.to_owned(), hash(payload));
        }
    }

    /// Whether the broker holds exactly this fact from us (only meaningful on a kept session).
    pub fn holds(&self, topic: &str, payload: &[u8]) -> bool {
        let i = self.lock();
        i.session_present && i.facts.get(topic) == Some(&hash(payload))
    }

    /// Whether a newer version of this retained fact has been handed to the client since.
    pub fn is_stale(&self, topic: &str, payload: &[u8]) -> bool {
        self.lock().facts.get(topic).is_some_and(|h| *h != hash(payload))
    }

    /// Whether the kept session is subscribed to exactly these filters.
    pub fn subscribed_to(&self, filters: &[String]) -> bool {
        let i = self.lock();
        i.session_present && !i.subscribed.is_empty() && i.subscribed == filters
    }

    pub fn set_subscribed(&self, filters: Vec<String>) {
        self.lock().subscribed = filters;
    }

    pub fn session_present(&self) -> bool {
        self.lock().session_present
    }

    /// The `state/link` report.
    pub fn report(
        &self,
        now_ms: i64,
        profile: debfleet_protocol::cfg::Profile,
        keepalive_s: u32,
        budget: u64,
        outbox: (u64, u64),
    ) -> LinkState {
        let mut i = self.lock();
        Self::roll(&mut i, now_ms);
        LinkState {
            v: CONTRACT_VERSION,
            ts: time::format_unix_ms(now_ms),
            day: i.today.day.clone(),
            profile,
            mqtt: i.mqtt,
            keepalive_s,
            session_present: i.session_present,
            budget,
            classes: TrafficClass::ALL
                .iter()
                .map(|c| (*c, i.today.classes.get(c).copied().unwrap_or_default()))
                .collect(),
            dropped: i.today.dropped,
            reconnects: i.today.connects.saturating_sub(1),
            outbox: outbox.0,
            outbox_bytes: outbox.1,
        }
    }

    /// Writes today's counters when they changed and [`SAVE_EVERY`] has passed (the core's
    /// thread, from its housekeeping).
    pub fn save(&self) {
        let due = self.lock().saved_at.is_none_or(|t| t.elapsed() >= SAVE_EVERY);
        if due {
            self.save_now();
        }
    }

    /// Writes today's counters now if they changed (at a stop).
    pub fn save_now(&self) {
        let day = {
            let mut i = self.lock();
            if !i.dirty {
                return;
            }
            i.dirty = false;
            i.saved_at = Some(std::time::Instant::now());
            i.today.clone()
        };
        if let Ok(b) = serde_json::to_vec(&day) {
            if let Err(e) = write_atomic(&self.path, &b, false) {
                tracing::warn!("cannot save the link counters: {e}");
            }
        }
    }

    /// At a clean stop, after the outbox drained: what the kept session holds, for the next run.
    pub fn save_facts(&self) {
        self.save_now();
        let facts = {
            let i = self.lock();
            if !i.session_present {
                return;
            }
            Facts { facts: i.facts.clone(), subscribed: i.subscribed.clone() }
        };
        if let Ok(b) = serde_json::to_vec(&facts) {
            let _ = write_atomic(&self.facts_path, &b, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_holds_back_telemetry_then_logs_never_results() {
        let dir = tempfile::tempdir().unwrap();
        let l = Link::open(dir.path(), time::now_unix_ms());
        let budget = 20_000;
        assert!(l.allows(TrafficClass::Telemetry, budget));
        l.sent(TrafficClass::Result, 15_000);
        assert!(!l.allows(TrafficClass::Telemetry, budget));
        assert!(l.allows(TrafficClass::Logs, budget));
        l.sent(TrafficClass::Ack, 3_000);
        assert!(!l.allows(TrafficClass::Logs, budget));
        assert!(l.allows(TrafficClass::Result, budget) && l.allows(TrafficClass::Ack, budget));
        assert!(l.allows(TrafficClass::Telemetry, 0), "0 is no budget");
        l.save();
        let again = Link::open(dir.path(), time::now_unix_ms());
        assert_eq!(again.sent_today(), l.sent_today(), "the day's counters survive a restart");
        let tomorrow = Link::open(dir.path(), time::now_unix_ms() + 86_400_000);
        assert_eq!(
            tomorrow.report(time::now_unix_ms() + 86_400_000, Default::default(), 30, 0, (0, 0)).classes
                [&TrafficClass::Result]
                .sent,
            0
        );
    }

    #[test]
    fn facts_count_only_on_a_kept_session_and_survive_only_a_clean_stop() {
        let dir = tempfile::tempdir().unwrap();
        let l = Link::open(dir.path(), time::now_unix_ms());
        l.connected(4, true);
        l.handed("t/meta", b"m1");
        l.set_subscribed(vec!["cmd/#".into()]);
        assert!(l.holds("t/meta", b"m1") && !l.holds("t/meta", b"m2"));
        // What the client re-sends into a kept session: an older version is stale.
        l.handed("t/op", br#"{"state":"running","ts":"1"}"#);
        l.handed("t/op", br#"{"state":"succeeded","ts":"2"}"#);
        assert!(l.is_stale("t/op", br#"{"state":"running","ts":"1"}"#));
        assert!(!l.is_stale("t/op", br#"{"state":"succeeded","ts":"3"}"#), "compared without ts");
        assert!(!l.is_stale("t/other", b"x"), "never handed: not stale");
        assert!(l.subscribed_to(&["cmd/#".into()]));
        l.save_facts();
        let next = Link::open(dir.path(), time::now_unix_ms());
        assert!(!next.holds("t/meta", b"m1"), "not before the broker says it kept the session");
        next.connected(4, true);
        assert!(next.holds("t/meta", b"m1"));
        // A crash after that start leaves no file: the run after it publishes everything.
        let after_crash = Link::open(dir.path(), time::now_unix_ms());
        after_crash.connected(4, true);
        assert!(!after_crash.holds("t/meta", b"m1"));
        // A new session (broker restarted, session expired) forgets everything.
        next.connected(4, false);
        assert!(!next.holds("t/meta", b"m1") && !next.subscribed_to(&["cmd/#".into()]));
        let r = next.report(time::now_unix_ms(), Default::default(), 30, 0, (0, 0));
        assert_eq!((r.reconnects, r.session_present, r.mqtt), (2, false, 4));
    }
}
