//! The outbox: everything the core wants on the broker, in order, handed to the MQTT client only
//! while a connection is up and only as fast as the client takes it (`publish().await` from a
//! task of its own, never from the one that polls the event loop). Nothing reliable is dropped
//! here; what a broken connection swallows inside the client is retained state, which the core
//! republishes on every connect.
//!
//! Unreliable messages (telemetry, logs) that a broken connection leaves here go back to the core
//! for the on-disk outbox (`spool.rs`); one that arrives while disconnected or over the queue's
//! bound is dropped and counted. The core refuses new commands with `busy` before that (see
//! `core::MAX_BACKLOG`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use debfleet_protocol::TrafficClass;
use rumqttc::QoS;
use tokio::sync::{watch, Notify};

use crate::core::Out;
use crate::link::Link;
use crate::spool::Spooled;
use debfleet_mqtt::packet_len;
use debfleet_mqtt::Client;

/// Above this many waiting messages an unreliable one is dropped rather than queued.
const MAX_QUEUED_UNRELIABLE: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Publish { topic: String, payload: Vec<u8>, retain: bool, qos: QoS, class: TrafficClass },
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
}

#[derive(Debug, Default)]
pub struct Queue {
    items: VecDeque<(Request, bool)>,
    /// Unreliable messages dropped since the start.
    pub dropped: u64,
}

impl Queue {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Queues an action for the broker; other actions are not the outbox's and come back.
    pub fn push(&mut self, out: Out, connected: bool) -> Option<Out> {
        let (req, reliable) = match out {
            Out::Publish { topic, payload, retain, reliable, class } => {
                let qos = if reliable { QoS::AtLeastOnce } else { QoS::AtMostOnce };
                (Request::Publish { topic, payload, retain, qos, class }, reliable)
            }
            // Subscriptions are made afresh on every connect.
            Out::Subscribe(_) | Out::Unsubscribe(_) if !connected => return None,
            Out::Subscribe(f) => (Request::Subscribe(f), true),
            Out::Unsubscribe(f) => (Request::Unsubscribe(f), true),
            other => return Some(other),
        };
        if !reliable && (!connected || self.items.len() >= MAX_QUEUED_UNRELIABLE) {
            self.dropped += 1;
            return None;
        }
        // A retained fact not sent yet is superseded by a newer one on the same topic (an
        // operation's accepted → running → succeeded while a backlog drains): only the latest
        // counts on the broker. A deletion (empty payload) never replaces a record, so a
        // final result is always delivered before its record is cleared.
        if let Request::Publish { topic, payload, retain: true, .. } = &req {
            if !payload.is_empty() {
                let last = self
                    .items
                    .iter()
                    .rposition(|(r, _)| matches!(r, Request::Publish { topic: t, retain: true, .. } if t == topic));
                if let Some(i) = last {
                    if matches!(&self.items[i].0, Request::Publish { payload: p, .. } if !p.is_empty()) {
                        self.items[i].0 = req;
                        return None;
                    }
                }
            }
        }
        // Subscriptions go ahead of the backlog, so commands get in while it drains, but keep
        // their order among themselves (groups A→B then B→A must end subscribed to A).
        if matches!(req, Request::Subscribe(_) | Request::Unsubscribe(_)) {
            let at = self
                .items
                .iter()
                .rposition(|(r, _)| matches!(r, Request::Subscribe(_) | Request::Unsubscribe(_)))
                .map_or(0, |i| i + 1);
            self.items.insert(at, (req, reliable));
        } else {
            self.items.push_back((req, reliable));
        }
        None
    }

    /// The connection broke: subscriptions go with the session (a kept one has them, a new
    /// one gets them afresh); telemetry and logs not sent come back for the on-disk outbox.
    pub fn disconnected(&mut self) -> Vec<Spooled> {
        let mut unsent = Vec::new();
        for (r, reliable) in std::mem::take(&mut self.items) {
            match r {
                Request::Publish { .. } if reliable => self.items.push_back((r, reliable)),
                Request::Publish { topic, payload, class, .. } => unsent.push(Spooled { class, topic, payload }),
                Request::Subscribe(_) | Request::Unsubscribe(_) => {}
            }
        }
        unsent
    }

    pub fn pop(&mut self) -> Option<Request> {
        self.items.pop_front().map(|(r, _)| r)
    }
}

/// The queue shared between the agent's loop and the sender task.
#[derive(Default)]
pub struct Outbox {
    pub queue: Mutex<Queue>,
    pub wake: Notify,
    /// Woken whenever the queue becomes empty (for a clean stop).
    pub drained: Notify,
}

impl Outbox {
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding the lock cannot leave the queue half-changed.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a request costs on the wire, MQTT packet only.
fn request_len(req: &Request) -> usize {
    match req {
        Request::Publish { topic, payload, qos, .. } => {
            packet_len(2 + topic.len() + if *qos == QoS::AtMostOnce { 0 } else { 2 } + payload.len())
        }
        Request::Subscribe(f) => packet_len(2 + f.iter().map(|f| 3 + f.len()).sum::<usize>()),
        Request::Unsubscribe(f) => f.iter().map(|f| packet_len(4 + f.len())).sum(),
    }
}

/// Hands the outbox to the client while `connected` says so, counting each request in its class
/// and noting the retained facts handed over (see [`Link::handed`]).
pub async fn send(
    client: watch::Receiver<Client>,
    outbox: Arc<Outbox>,
    link: Arc<Link>,
    mut connected: watch::Receiver<bool>,
) {
    loop {
        while !*connected.borrow_and_update() {
            if connected.changed().await.is_err() {
                return;
            }
        }
        let next = outbox.lock().pop();
        let Some(req) = next else {
            outbox.drained.notify_waiters();
            tokio::select! {
                _ = outbox.wake.notified() => {}
                r = connected.changed() => if r.is_err() { return },
            }
            continue;
        };
        match &req {
            Request::Publish { class, topic, payload, retain, qos } => {
                link.sent(*class, request_len(&req));
                if *retain && *qos == QoS::AtLeastOnce {
                    link.handed(topic, payload);
                }
            }
            other => link.sent(TrafficClass::Control, request_len(other)),
        }
        // The current client: the connection task replaces it when it falls back to 3.1.1.
        let client = client.borrow().clone();
        let r = match req {
            Request::Publish { topic, payload, retain, qos, .. } => client.publish(topic, qos, retain, payload).await,
            Request::Subscribe(f) => client.subscribe_many(f).await,
            Request::Unsubscribe(f) => {
                let mut r = Ok(());
                for f in f {
                    r = r.and(client.unsubscribe(f).await);
                }
                r
            }
        };
        if let Err(e) = r {
            // Only when the client is gone (the agent is stopping).
            tracing::debug!("MQTT request not queued: {e}");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &str, reliable: bool) -> Out {
        let class = if reliable { TrafficClass::Result } else { TrafficClass::Telemetry };
        Out::Publish { topic: topic.into(), payload: b"x".to_vec(), retain: reliable, reliable, class }
    }

    #[test]
    fn keeps_order_and_every_reliable_message() {
        let mut q = Queue::default();
        for i in 0..5000 {
            assert!(q.push(publish(&format!("t/{i}"), true), true).is_none());
        }
        assert_eq!(q.len(), 5000);
        let first = q.pop().unwrap();
        assert!(matches!(first, Request::Publish { ref topic, .. } if topic == "t/0"));
    }

    #[test]
    fn a_newer_retained_fact_replaces_an_unsent_one_but_a_deletion_never_does() {
        let mut q = Queue::default();
        let rec = |p: &[u8]| Out::Publish {
            topic: "op/1".into(),
            payload: p.to_vec(),
            retain: true,
            reliable: true,
            class: TrafficClass::Result,
        };
        q.push(rec(b"accepted"), true);
        q.push(publish("other", true), true);
        q.push(rec(b"succeeded"), true);
        q.push(rec(b""), true);
        q.push(rec(b"again"), true);
        let sent: Vec<Vec<u8>> = std::iter::from_fn(|| q.pop())
            .map(|r| match r {
                Request::Publish { payload, .. } => payload,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(sent, [b"succeeded".to_vec(), b"x".to_vec(), Vec::new(), b"again".to_vec()]);
    }

    #[test]
    fn drops_unreliable_when_disconnected_or_over_the_bound() {
        let mut q = Queue::default();
        q.push(publish("tele", false), false);
        assert_eq!((q.len(), q.dropped), (0, 1));
        for i in 0..MAX_QUEUED_UNRELIABLE {
            q.push(publish(&format!("op/{i}"), true), true);
        }
        q.push(publish("tele", false), true);
        assert_eq!((q.len(), q.dropped), (MAX_QUEUED_UNRELIABLE, 2));
    }

    #[test]
    fn subscription_changes_keep_their_order_ahead_of_the_backlog() {
        let mut q = Queue::default();
        q.push(publish("op/1", true), true);
        q.push(Out::Unsubscribe(vec!["g/a".into()]), true);
        q.push(Out::Subscribe(vec!["g/b".into()]), true);
        q.push(Out::Unsubscribe(vec!["g/b".into()]), true);
        q.push(Out::Subscribe(vec!["g/a".into()]), true);
        let order: Vec<Request> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            order,
            [
                Request::Unsubscribe(vec!["g/a".into()]),
                Request::Subscribe(vec!["g/b".into()]),
                Request::Unsubscribe(vec!["g/b".into()]),
                Request::Subscribe(vec!["g/a".into()]),
                Request::Publish {
                    topic: "op/1".into(),
                    payload: b"x".to_vec(),
                    retain: true,
                    qos: QoS::AtLeastOnce,
                    class: TrafficClass::Result
                },
            ]
        );
    }

    #[test]
    fn subscriptions_go_first_and_do_not_outlive_the_connection() {
        let mut q = Queue::default();
        q.push(publish("op", true), true);
        q.push(Out::Subscribe(vec!["cmd/+".into()]), true);
        assert!(matches!(q.pop(), Some(Request::Subscribe(_))));
        q.push(Out::Subscribe(vec!["cmd/+".into()]), true);
        q.push(publish("tele", false), true);
        let unsent = q.disconnected();
        assert_eq!(unsent, [Spooled { class: TrafficClass::Telemetry, topic: "tele".into(), payload: b"x".to_vec() }]);
        assert_eq!(q.len(), 1);
        assert!(matches!(q.pop(), Some(Request::Publish { ref topic, .. }) if topic == "op"));
        assert_eq!(q.push(Out::Restart, true), Some(Out::Restart));
    }
}
