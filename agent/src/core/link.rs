//! Telemetry and logs on their way out: straight to the broker when the link is up, within the
//! budget and nothing older waits; otherwise into the on-disk outbox, which drains at
//! `outbox.drain_per_s` while the budget allows. Also the `state/link` report.

use debfleet_protocol::{LogBatch, Telemetry, Topic, TrafficClass};

use super::{Core, Out};
use crate::spool::Spooled;

/// Over this many messages waiting in the in-memory outbox, telemetry and logs go to disk.
const LIVE_BACKLOG: usize = 100;

impl Core {
    /// A telemetry view: published (retained) when it can go now, else kept in the outbox.
    pub fn telemetry(&mut self, msg: &Telemetry) -> Option<Out> {
        let out = self.publish(Topic::Telemetry(self.cfg.device_id.clone()), msg);
        let sent = self.stream(out);
        if sent.is_none() {
            self.telemetry_behind = Some(msg.clone());
        }
        sent
    }

    pub fn logs(&mut self, batch: &LogBatch) -> Option<Out> {
        let out = self.publish(Topic::Logs(self.cfg.device_id.clone()), batch);
        self.stream(out)
    }

    fn can_send_now(&self, class: TrafficClass) -> bool {
        self.connected_since.is_some()
            && self.backlog < LIVE_BACKLOG
            && self.spool.as_ref().is_none_or(|s| s.is_empty())
            && self.link.allows(class, self.runtime.budget.bytes_per_day)
    }

    pub(super) fn stream(&mut self, out: Out) -> Option<Out> {
        let Out::Publish { topic, payload, class, .. } = &out else { return Some(out) };
        if self.can_send_now(*class) {
            return Some(out);
        }
        let m = Spooled { class: *class, topic: topic.clone(), payload: payload.clone() };
        self.spool_push(m);
        None
    }

    pub(super) fn spool_push(&mut self, m: Spooled) {
        let Some(spool) = &mut self.spool else {
            self.link.dropped(1);
            return;
        };
        let before = spool.dropped;
        if let Err(e) = spool.push(&m) {
            tracing::warn!("cannot write to the outbox: {e}; a message was dropped");
            spool.dropped += 1;
        }
        self.link.dropped(spool.dropped - before);
    }

    /// Up to `outbox.drain_per_s` messages from the on-disk outbox (called every second),
    /// published without the retain flag: they are history, the retained view stays current.
    pub(super) fn drain(&mut self, now_ms: i64) -> Vec<Out> {
        let mut out = Vec::new();
        let due = now_ms - self.link_reported_ms >= i64::from(self.runtime.link.report_s) * 1000;
        if self.connected_since.is_some() && due {
            out.push(self.link_report(now_ms));
        }
        if self.connected_since.is_none() || self.backlog >= LIVE_BACKLOG {
            return out;
        }
        let budget = self.runtime.budget.bytes_per_day;
        let link = self.link.clone();
        let Some(spool) = &mut self.spool else { return out };
        let n = self.runtime.outbox.drain_per_s as usize;
        let popped = spool.pop_while(n, |class| link.allows(class, budget));
        let emptied = !popped.is_empty() && spool.is_empty();
        for m in popped {
            let reliable = false;
            out.push(Out::Publish { topic: m.topic, payload: m.payload, retain: false, reliable, class: m.class });
        }
        if emptied {
            // The backlog is gone: say so, the report on connect said it was there.
            out.push(self.link_report(now_ms));
        }
        out
    }

    /// The `state/link` report (retained).
    pub(super) fn link_report(&mut self, now_ms: i64) -> Out {
        self.link_reported_ms = now_ms;
        let outbox = self.spool.as_ref().map_or((0, 0), |s| s.len());
        let r = self.link.report(
            now_ms,
            self.runtime.profile,
            self.runtime.link.keepalive_s,
            self.runtime.budget.bytes_per_day,
            outbox,
        );
        self.publish(Topic::StateLink(self.cfg.device_id.clone()), &r)
    }

    /// The connection settings the runtime configuration asks for.
    pub fn link_settings(&self) -> crate::connection::Settings {
        crate::connection::Settings {
            keepalive_s: self.runtime.link.keepalive_s,
            persistent_session: self.runtime.link.persistent_session,
            session_expiry_s: self.runtime.link.session_expiry_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::super::*;

    fn sample(cpu: f64) -> Telemetry {
        Telemetry { v: 1, ts: time::now(), cpu: Some(cpu), ..Telemetry::default() }
    }

    #[test]
    fn offline_telemetry_waits_on_disk_and_drains_without_retain_after_the_connect() {
        let mut f = fixture(false);
        assert!(f.core.telemetry(&sample(1.0)).is_none(), "not connected: into the outbox");
        assert!(f.core.telemetry(&sample(2.0)).is_none());
        let outs = f.core.on_connected(time::now(), 0);
        let tele: Vec<_> = publishes(&outs).into_iter().filter(|(t, _, _)| t.ends_with("/telemetry")).collect();
        assert_eq!(tele.len(), 1, "the latest view, retained: {tele:?}");
        assert_eq!((tele[0].1["cpu"].as_f64(), tele[0].2), (Some(2.0), true));
        // While the outbox drains, new samples queue behind the older ones.
        assert!(f.core.telemetry(&sample(3.0)).is_none());
        let drained = f.core.drain(time::now_unix_ms());
        let cpus: Vec<(f64, bool)> = publishes(&drained)
            .into_iter()
            .filter(|(t, _, _)| t.ends_with("/telemetry"))
            .map(|(_, v, r)| (v["cpu"].as_f64().unwrap(), r))
            .collect();
        assert_eq!(cpus, [(1.0, false), (2.0, false), (3.0, false)]);
        assert!(f.core.telemetry(&sample(4.0)).is_some(), "outbox empty: straight out again");
    }

    #[test]
    fn over_budget_telemetry_waits_but_results_go() {
        let mut f = fixture(false);
        f.core.runtime.budget.bytes_per_day = 20_000;
        f.core.on_connected(time::now(), 0);
        f.core.link.sent(TrafficClass::Result, 15_000);
        assert!(f.core.telemetry(&sample(1.0)).is_none(), "over 70 %: telemetry waits");
        let outs = f.core.on_message("debfleet/device/d1/cmd/ping", br#"{"id":"p1"}"#, false, 1000);
        assert_eq!(op_states(&outs, "p1").last().unwrap().state, debfleet_protocol::OpState::Succeeded);
        assert!(publishes(&f.core.drain(time::now_unix_ms())).iter().all(|(t, _, _)| !t.ends_with("/telemetry")));
        let report = publishes(&[f.core.link_report(time::now_unix_ms())]).pop().unwrap().1;
        assert_eq!((report["outbox"].as_u64(), report["budget"].as_u64()), (Some(1), Some(20_000)));
    }

    #[test]
    fn a_kept_session_gets_only_changed_facts_and_no_subscribe() {
        let mut f = fixture(false);
        f.core.runtime.link.persistent_session = true;
        f.core.runtime.link.skip_unchanged = true;
        f.core.runtime.link.report_connects = true;
        f.core.link.connected(4, false);
        let first = f.core.on_connected(time::now(), 0);
        assert!(matches!(first[0], Out::Subscribe(_)));
        for o in &first {
            if let Out::Publish { topic, payload, retain: true, .. } = o {
                f.core.link.handed(topic, payload);
            }
        }
        f.core.on_disconnected();
        f.core.link.connected(4, true);
        let again = f.core.on_connected(time::now(), 0);
        let topics: Vec<String> = publishes(&again).into_iter().map(|(t, _, _)| t).collect();
        assert!(!again.iter().any(|o| matches!(o, Out::Subscribe(_))), "{again:?}");
        assert_eq!(topics, ["debfleet/device/d1/status", "debfleet/device/d1/state/link"], "{topics:?}");
        // A session the broker did not keep gets everything again.
        f.core.on_disconnected();
        f.core.link.connected(4, false);
        let fresh = f.core.on_connected(time::now(), 0);
        assert!(matches!(fresh[0], Out::Subscribe(_)));
        assert!(publishes(&fresh).len() >= 5);
    }

    #[test]
    fn an_expired_command_is_not_run() {
        let mut f = fixture(false);
        f.core.on_connected(time::now(), 0);
        let outs = f.core.on_message(
            "debfleet/device/d1/cmd/install",
            br#"{"id":"i1","packages":["hello"],"expires_at":"2026-01-01T00:00:00Z"}"#,
            false,
            time::parse_unix_ms("2026-01-08T00:00:00Z").unwrap(),
        );
        let last = op_states(&outs, "i1").pop().unwrap();
        assert_eq!(last.state, debfleet_protocol::OpState::Expired);
        assert_eq!(last.error.unwrap().code, ErrorCode::Expired);
        assert!(!outs.iter().any(|o| matches!(o, Out::Job(_))));
    }
}
