//! The MQTT edge: owns rumqttc's event loop, reconnects with capped exponential backoff and
//! jitter, refreshes the last will for each connection, applies new connection settings with a
//! clean reconnect, counts what the link carries that the outbox does not see (connects,
//! keepalives, acknowledgements, incoming commands), and reports what happens as the core's
//! [`CoreEvent`]s (connected, disconnected, a message).

use std::sync::Arc;
use std::time::Duration;

use debfleet_protocol::time;
use debfleet_protocol::TrafficClass;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, ReconnectCfg};
use crate::core::Event as CoreEvent;
use crate::link::Link;
use debfleet_mqtt::{packet_len, Client, Endpoint, Loop, Net};
pub use debfleet_mqtt::{Protocol, Settings};

/// Backoff state: doubling from the initial delay up to the cap, with "equal jitter" (half
/// fixed, half random) so a fleet that lost the same broker does not return in lockstep.
pub struct Backoff {
    initial: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(cfg: &ReconnectCfg) -> Backoff {
        Backoff {
            initial: Duration::from_millis(cfg.initial_delay_ms),
            cap: Duration::from_secs(cfg.max_delay_s),
            attempt: 0,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn next_delay(&mut self) -> Duration {
        let exp = self.initial.saturating_mul(1u32 << self.attempt.min(20)).min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = exp / 2;
        half + Duration::from_millis(fastrand::u64(0..=half.as_millis() as u64))
    }
}

/// Drives the event loop until `shutdown` is cancelled; then it keeps polling briefly so that
/// what was queued before the disconnect (the `offline` status) reaches the broker.
pub struct Driver {
    pub endpoint: Endpoint,
    pub reconnect: ReconnectCfg,
    pub protocol: Protocol,
    /// The client the sender uses: replaced when the connection falls back to 3.1.1.
    pub client: watch::Sender<Client>,
    pub events: mpsc::Sender<CoreEvent>,
    pub link: Arc<Link>,
    pub settings: watch::Receiver<Settings>,
    pub shutdown: CancellationToken,
}

/// Where the agent connects, as whom.
pub fn endpoint(cfg: &AgentConfig) -> anyhow::Result<Endpoint> {
    use anyhow::Context;
    let ca = match (&cfg.ca_file, cfg.broker.tls) {
        (Some(f), true) => Some(std::fs::read(f).with_context(|| format!("ca_file: reading {}", f.display()))?),
        _ => None,
    };
    Ok(Endpoint {
        client_id: format!("debfleet-agent-{}", cfg.device_id),
        host: cfg.broker.host.clone(),
        port: cfg.broker.port,
        ca,
        credentials: cfg.username.clone().zip(cfg.password.clone()),
        max_packet: debfleet_protocol::limits::MAX_PACKET_BYTES,
        // Small: the outbox holds the backlog; the client's channel only feeds the socket.
        channel: 32,
    })
}

/// The first client and event loop: MQTT 5 unless the configuration says 3.1.1.
pub fn open(ep: &Endpoint, protocol: Protocol, settings: Settings) -> (Client, Loop) {
    debfleet_mqtt::open(ep, if protocol == Protocol::V311 { 4 } else { 5 }, settings)
}

pub async fn drive(d: Driver, mut eventloop: Loop, will: impl Fn(&str) -> (String, Vec<u8>)) {
    let Driver { endpoint, reconnect, protocol, client, events, link, mut settings, shutdown } = d;
    let mut backoff = Backoff::new(&reconnect);
    let mut connected = false;
    // Whether a connection at the current protocol level ever succeeded (then failures are the
    // network's, not the level's).
    let mut level_proven = false;
    let mut relinking = false;
    let mut since = time::now();
    let set_will = |el: &mut Loop, since: &str| {
        let (topic, payload) = will(since);
        el.set_will(topic, payload);
    };
    set_will(&mut eventloop, &since);
    loop {
        let polled = tokio::select! {
            r = eventloop.poll() => r,
            _ = shutdown.cancelled() => break,
            Ok(()) = settings.changed() => {
                let s = *settings.borrow_and_update();
                eventloop.apply(s);
                if connected {
                    // A clean DISCONNECT (no last will), then a new connection with the new
                    // settings.
                    tracing::info!("reconnecting with keepalive {} s, persistent session {}", s.keepalive_s, s.persistent_session);
                    relinking = client.borrow().try_disconnect();
                }
                continue;
            }
        };
        match polled {
            Ok(Net::ConnAck { session_present }) => {
                if session_present {
                    // What the client sends again must not put an older fact over a newer one.
                    let dropped = eventloop.drop_pending(|t, p| link.is_stale(t, p));
                    if dropped > 0 {
                        tracing::debug!("{dropped} superseded retained publishes not sent again");
                    }
                }
                connected = true;
                level_proven = true;
                backoff.reset();
                link.sent(TrafficClass::Control, eventloop.connect_len());
                link.received(TrafficClass::Control, 4);
                link.connected(eventloop.level(), session_present);
                tracing::info!(mqtt = eventloop.level(), session_present, "connected to the broker");
                let _ = events.send(CoreEvent::Connected { since: since.clone() }).await;
            }
            Ok(Net::Publish { topic, payload, retain, qos1 }) => {
                link.received(
                    TrafficClass::Ack,
                    packet_len(2 + topic.len() + if qos1 { 2 } else { 0 } + payload.len()),
                );
                let _ = events.send(CoreEvent::Message { topic, payload, retain }).await;
            }
            Ok(Net::PingResp) => link.received(TrafficClass::Control, 2),
            Ok(Net::PubAck { refused }) => {
                if refused {
                    // Seen when the broker's ACL does not give this device its own topics.
                    tracing::warn!("the broker refused a message from this device (not authorized?)");
                }
                link.received(TrafficClass::Control, 4)
            }
            Ok(Net::SubAck(n)) => link.received(TrafficClass::Control, 4 + n),
            Ok(Net::UnsubAck) => link.received(TrafficClass::Control, 4),
            Ok(Net::OutPingReq) => link.sent(TrafficClass::Control, 2),
            Ok(Net::OutPubAck) => link.sent(TrafficClass::Control, 4),
            Ok(Net::OutDisconnect) if relinking => {
                // The broker drops the connection on a DISCONNECT; don't wait for it.
                relinking = false;
                eventloop.clean();
                connected = false;
                link.sent(TrafficClass::Control, 2);
                let _ = events.send(CoreEvent::Disconnected { unsent: Vec::new() }).await;
                since = time::now();
                set_will(&mut eventloop, &since);
            }
            Ok(_) => {}
            Err(e) => {
                if connected {
                    connected = false;
                    // Routine on a cellular link, and counted in `state/link`: not a warning that
                    // would cost a log batch on a metered link.
                    tracing::info!("connection to the broker lost: {}", e.message);
                    let _ = events.send(CoreEvent::Disconnected { unsent: Vec::new() }).await;
                } else if protocol == Protocol::Auto && eventloop.level() == 5 && !level_proven && e.maybe_unsupported {
                    // The broker took the connection but not MQTT 5: speak 3.1.1 from now on.
                    tracing::info!("the broker did not accept MQTT 5 ({}); using MQTT 3.1.1", e.message);
                    let (c, l) = debfleet_mqtt::open(&endpoint, 4, *settings.borrow());
                    eventloop = l;
                    let _ = client.send(c);
                    since = time::now();
                    set_will(&mut eventloop, &since);
                    continue;
                } else {
                    tracing::debug!("cannot connect to the broker: {}", e.message);
                }
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return,
                }
                since = time::now();
                set_will(&mut eventloop, &since);
            }
        }
    }
    if !connected {
        return;
    }
    let flush = async {
        loop {
            match eventloop.poll().await {
                Ok(Net::OutDisconnect) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(1500), flush).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut b = Backoff::new(&ReconnectCfg { initial_delay_ms: 100, max_delay_s: 2 });
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let full = Duration::from_millis(100 * (1 << i)).min(Duration::from_secs(2));
            assert!(*d >= full / 2 && *d <= full, "attempt {i}: {d:?} not in [{:?}, {full:?}]", full / 2);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
