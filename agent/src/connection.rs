//! The MQTT edge: owns rumqttc's event loop, reconnects with capped exponential backoff and
//! jitter, refreshes the last will for each connection, applies new connection settings with a
//! clean reconnect, counts what the link carries that the outbox does not see (connects,
//! keepalives, acknowledgements, incoming commands), and reports what happens as the core's
//! [`CoreEvent`]s (connected, disconnected, a message).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use debfleet_protocol::limits::MAX_PACKET_BYTES;
use debfleet_protocol::time;
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport,
};
use debfleet_protocol::TrafficClass;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, ReconnectCfg};
use crate::core::Event as CoreEvent;
use crate::link::Link;

/// The connection settings the runtime configuration controls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub keepalive_s: u32,
    pub persistent_session: bool,
}

impl Settings {
    fn apply(&self, opts: &mut MqttOptions) {
        opts.set_keep_alive(Duration::from_secs(self.keepalive_s.into()));
        opts.set_clean_session(!self.persistent_session);
    }
}

pub fn client(cfg: &AgentConfig, settings: Settings) -> Result<(AsyncClient, EventLoop)> {
    let mut opts = MqttOptions::new(format!("debfleet-agent-{}", cfg.device_id), &cfg.broker.host, cfg.broker.port);
    settings.apply(&mut opts);
    opts.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    if let (Some(user), Some(pass)) = (&cfg.username, &cfg.password) {
        opts.set_credentials(user, pass);
    }
    if cfg.broker.tls {
        let ca_file = cfg.ca_file.as_ref().expect("validated: mqtts needs ca_file");
        let ca = std::fs::read(ca_file).with_context(|| format!("ca_file: reading {}", ca_file.display()))?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Simple { ca, alpn: None, client_auth: None }));
    }
    // Small: the outbox holds the backlog; the client's channel only feeds the socket. What sits
    // in it when a connection breaks is dropped by rumqttc on a clean session anyway.
    let (client, mut eventloop) = AsyncClient::new(opts, 32);
    // Every answer is a few small publishes back to back: without TCP_NODELAY each waits for the
    // broker's delayed ACK (tens of milliseconds).
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    Ok((client, eventloop))
}

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

/// Bytes of an MQTT packet with a remaining length of `n`: the fixed header's varint.
pub fn packet_len(n: usize) -> usize {
    1 + match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    } + n
}

/// What a CONNECT with these options costs, and the TCP handshake before it (SYN, SYN-ACK's
/// answer): counted as control traffic.
fn connect_len(opts: &MqttOptions) -> usize {
    let mut n = 10 + 2 + opts.client_id().len();
    if let Some(w) = opts.last_will() {
        n += 4 + w.topic.len() + w.message.len();
    }
    if let Some(l) = opts.credentials() {
        n += 4 + l.username.len() + l.password.len();
    }
    packet_len(n) + 2 * crate::link::TCP_IP_OVERHEAD as usize
}

/// Drives the event loop until `shutdown` is cancelled; then it keeps polling briefly so that
/// what was queued before the disconnect (the `offline` status) reaches the broker.
pub struct Driver {
    pub eventloop: EventLoop,
    pub client: AsyncClient,
    pub events: mpsc::Sender<CoreEvent>,
    pub reconnect: ReconnectCfg,
    pub link: Arc<Link>,
    pub settings: watch::Receiver<Settings>,
    pub shutdown: CancellationToken,
}

pub async fn drive(d: Driver, will: impl Fn(&str) -> (String, Vec<u8>)) {
    let Driver { mut eventloop, client, events, reconnect, link, mut settings, shutdown } = d;
    let mut backoff = Backoff::new(&reconnect);
    let mut connected = false;
    let mut relinking = false;
    let mut since = time::now();
    let set_will = |el: &mut EventLoop, since: &str| {
        let (topic, payload) = will(since);
        el.mqtt_options.set_last_will(LastWill::new(topic, payload, QoS::AtLeastOnce, true));
    };
    set_will(&mut eventloop, &since);
    loop {
        let polled = tokio::select! {
            r = eventloop.poll() => r,
            _ = shutdown.cancelled() => break,
            Ok(()) = settings.changed() => {
                let s = *settings.borrow_and_update();
                s.apply(&mut eventloop.mqtt_options);
                if connected {
                    // A clean DISCONNECT (no last will), then a new connection with the new
                    // settings once the broker closes this one.
                    tracing::info!("reconnecting with keepalive {} s, persistent session {}", s.keepalive_s, s.persistent_session);
                    relinking = client.try_disconnect().is_ok();
                }
                continue;
            }
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                connected = true;
                backoff.reset();
                link.sent(TrafficClass::Control, connect_len(&eventloop.mqtt_options));
                link.received(TrafficClass::Control, 4);
                link.connected(4, ack.session_present);
                tracing::info!(session_present = ack.session_present, "connected to the broker");
                let _ = events.send(CoreEvent::Connected { since: since.clone() }).await;
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let topic = p.topic.clone();
                let qos_extra = if p.qos == QoS::AtMostOnce { 0 } else { 2 };
                link.received(TrafficClass::Ack, packet_len(2 + topic.len() + qos_extra + p.payload.len()));
                let _ = events.send(CoreEvent::Message { topic, payload: p.payload.to_vec(), retain: p.retain }).await;
            }
            Ok(Event::Incoming(Packet::PingResp)) => link.received(TrafficClass::Control, 2),
            Ok(Event::Incoming(Packet::PubAck(_))) => link.received(TrafficClass::Control, 4),
            Ok(Event::Incoming(Packet::SubAck(s))) => link.received(TrafficClass::Control, 4 + s.return_codes.len()),
            Ok(Event::Incoming(Packet::UnsubAck(_))) => link.received(TrafficClass::Control, 4),
            Ok(Event::Outgoing(Outgoing::PingReq)) => link.sent(TrafficClass::Control, 2),
            Ok(Event::Outgoing(Outgoing::PubAck(_))) => link.sent(TrafficClass::Control, 4),
            Ok(Event::Outgoing(Outgoing::Disconnect)) if relinking => {
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
                    tracing::warn!("connection to the broker lost: {e}");
                    let _ = events.send(CoreEvent::Disconnected { unsent: Vec::new() }).await;
                } else {
                    tracing::debug!("cannot connect to the broker: {e}");
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
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
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
