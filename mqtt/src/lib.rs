//! One face for the two MQTT protocol levels rumqttc implements as separate types: 5 where the
//! broker speaks it (session expiry, message expiry), 3.1.1 otherwise. [`Client`] is what
//! requests go to; [`Loop`] is the event loop a connection task polls, its packets reduced to
//! the few [`Net`] events debfleet acts on. No policy here: when to fall back is the caller's
//! decision, from [`PollError::maybe_unsupported`].

use std::time::Duration;

use rumqttc::v5 as m5;
pub use rumqttc::QoS;
use rumqttc::{TlsConfiguration, Transport};

/// Counted per MQTT packet on top of its own bytes: IPv4 and TCP headers with the timestamp
/// option Linux sends by default (20 + 32).
pub const TCP_IP_OVERHEAD: u64 = 52;

/// Where and who to connect as.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub client_id: String,
    pub host: String,
    pub port: u16,
    /// With a CA (PEM), the connection is TLS.
    pub ca: Option<Vec<u8>>,
    pub credentials: Option<(String, String)>,
    /// The largest packet either side may send.
    pub max_packet: usize,
    /// Capacity of the client's request channel.
    pub channel: usize,
}

/// Which protocol level to speak (`mqtt` in agent.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum Protocol {
    /// 5, and 3.1.1 when the broker refuses 5.
    #[serde(rename = "auto")]
    Auto,
    #[serde(rename = "5")]
    V5,
    #[serde(rename = "3.1.1")]
    V311,
}

/// The connection settings the runtime configuration controls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub keepalive_s: u32,
    pub persistent_session: bool,
    /// MQTT 5 only: how long the broker keeps a kept session after the connection ends.
    pub session_expiry_s: u32,
}

#[derive(Clone)]
pub enum Client {
    V4(rumqttc::AsyncClient),
    V5(m5::AsyncClient),
}

fn qos5(q: QoS) -> m5::mqttbytes::QoS {
    match q {
        QoS::AtMostOnce => m5::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => m5::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => m5::mqttbytes::QoS::ExactlyOnce,
    }
}

impl Client {
    pub fn level(&self) -> u8 {
        match self {
            Client::V4(_) => 4,
            Client::V5(_) => 5,
        }
    }

    pub async fn publish(&self, topic: String, qos: QoS, retain: bool, payload: Vec<u8>) -> Result<(), String> {
        self.publish_expiring(topic, qos, retain, payload, None).await
    }

    /// With MQTT 5 and `expiry_s`, the broker discards the message when it could not deliver it
    /// within that many seconds (to a session it keeps for an absent client); 3.1.1 has no such
    /// thing and publishes it plainly.
    pub async fn publish_expiring(
        &self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
        expiry_s: Option<u32>,
    ) -> Result<(), String> {
        match self {
            Client::V4(c) => c.publish(topic, qos, retain, payload).await.map_err(|e| e.to_string()),
            Client::V5(c) => match expiry_s {
                None => c.publish(topic, qos5(qos), retain, payload).await.map_err(|e| e.to_string()),
                Some(s) => {
                    let props =
                        m5::mqttbytes::v5::PublishProperties { message_expiry_interval: Some(s), ..Default::default() };
                    c.publish_with_properties(topic, qos5(qos), retain, payload, props).await.map_err(|e| e.to_string())
                }
            },
        }
    }

    pub async fn subscribe_many(&self, filters: Vec<String>) -> Result<(), String> {
        self.subscribe_many_with(filters, QoS::AtLeastOnce).await
    }

    /// At `qos`. A view that re-reads the retained set on every connect needs no QoS 1; at QoS 0
    /// a broker does not count its retained flood against the per-client queue (Mosquitto's
    /// `max_queued_messages`), which a large fleet's retained set would overflow.
    pub async fn subscribe_many_with(&self, filters: Vec<String>, qos: QoS) -> Result<(), String> {
        match self {
            Client::V4(c) => c
                .subscribe_many(filters.into_iter().map(|f| rumqttc::SubscribeFilter::new(f, qos)))
                .await
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .subscribe_many(filters.into_iter().map(|f| m5::mqttbytes::v5::Filter::new(f, qos5(qos))))
                .await
                .map_err(|e| e.to_string()),
        }
    }

    pub async fn unsubscribe(&self, filter: String) -> Result<(), String> {
        match self {
            Client::V4(c) => c.unsubscribe(filter).await.map_err(|e| e.to_string()),
            Client::V5(c) => c.unsubscribe(filter).await.map_err(|e| e.to_string()),
        }
    }

    pub async fn disconnect(&self) -> Result<(), String> {
        match self {
            Client::V4(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Client::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
        }
    }

    pub fn try_disconnect(&self) -> bool {
        match self {
            Client::V4(c) => c.try_disconnect().is_ok(),
            Client::V5(c) => c.try_disconnect().is_ok(),
        }
    }
}

/// What the connection task acts on.
#[derive(Debug)]
pub enum Net {
    ConnAck {
        session_present: bool,
    },
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        qos1: bool,
    },
    PingResp,
    /// `refused`: the broker did not take the message (MQTT 5 reason code: not authorized,
    /// quota, topic name invalid...). Under 3.1.1 a broker drops such a message silently.
    PubAck {
        refused: bool,
    },
    SubAck(usize),
    UnsubAck,
    OutPingReq,
    OutPubAck,
    OutDisconnect,
    Other,
}

/// A failed poll: the message, and whether it looks like a broker that does not speak the
/// protocol level tried (the connection was made, then refused or closed without a CONNACK).
pub struct PollError {
    pub message: String,
    pub maybe_unsupported: bool,
    /// The broker refused the client's credentials or the client itself.
    pub refused: bool,
}

pub enum Loop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<m5::EventLoop>),
}

/// Client and event loop for `level` (4 or 5), with `settings`. Every debfleet client sets
/// TCP_NODELAY: an answer is a few small publishes back to back, and each would otherwise wait
/// for the broker's delayed ACK (tens of milliseconds).
pub fn open(ep: &Endpoint, level: u8, settings: Settings) -> (Client, Loop) {
    let transport = ep.ca.as_ref().map(|ca| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Transport::tls_with_config(TlsConfiguration::Simple { ca: ca.clone(), alpn: None, client_auth: None })
    });
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    if level == 5 {
        let mut opts = m5::MqttOptions::new(&ep.client_id, &ep.host, ep.port);
        // Also lifts rumqttc's 10 KiB default limit on incoming packets (rumqtt #1018).
        opts.set_max_packet_size(Some(ep.max_packet as u32));
        if let Some((user, pass)) = &ep.credentials {
            opts.set_credentials(user, pass);
        }
        if let Some(t) = transport {
            opts.set_transport(t);
        }
        opts.set_network_options(net);
        // rumqttc's v5 state preallocates a slot per possible in-flight publish: unbounded, that
        // is 65,536 slots (about 14 MiB). 100 is its 3.1.1 default.
        opts.set_outgoing_inflight_upper_limit(100);
        let (client, eventloop) = m5::AsyncClient::new(opts, ep.channel);
        let mut l = Loop::V5(Box::new(eventloop));
        l.apply(settings);
        return (Client::V5(client), l);
    }
    let mut opts = rumqttc::MqttOptions::new(&ep.client_id, &ep.host, ep.port);
    opts.set_max_packet_size(ep.max_packet, ep.max_packet);
    if let Some((user, pass)) = &ep.credentials {
        opts.set_credentials(user, pass);
    }
    if let Some(t) = transport {
        opts.set_transport(t);
    }
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, ep.channel);
    eventloop.set_network_options(net);
    let mut l = Loop::V4(Box::new(eventloop));
    l.apply(settings);
    (Client::V4(client), l)
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

impl Loop {
    pub fn level(&self) -> u8 {
        match self {
            Loop::V4(_) => 4,
            Loop::V5(_) => 5,
        }
    }

    pub fn apply(&mut self, s: Settings) {
        let keep = Duration::from_secs(s.keepalive_s.into());
        match self {
            Loop::V4(el) => {
                el.mqtt_options.set_keep_alive(keep);
                el.mqtt_options.set_clean_session(!s.persistent_session);
            }
            Loop::V5(el) => {
                el.options.set_keep_alive(keep);
                el.options.set_clean_start(!s.persistent_session);
                el.options.set_session_expiry_interval(s.persistent_session.then_some(s.session_expiry_s));
            }
        }
    }

    pub fn set_will(&mut self, topic: String, payload: Vec<u8>) {
        match self {
            Loop::V4(el) => {
                el.mqtt_options.set_last_will(rumqttc::LastWill::new(topic, payload, QoS::AtLeastOnce, true));
            }
            Loop::V5(el) => {
                let will = m5::mqttbytes::v5::LastWill::new(topic, payload, qos5(QoS::AtLeastOnce), true, None);
                el.options.set_last_will(will);
            }
        }
    }

    /// Removes from what the client will send again into a kept session (its publishes that were
    /// in flight when the last connection broke) the retained publishes `stale` names. The client
    /// re-sends them in packet-id order, not in the order they were first sent, so an older
    /// version of a retained fact could land after a newer one.
    pub fn drop_pending(&mut self, stale: impl Fn(&str, &[u8]) -> bool) -> usize {
        let before;
        let after;
        match self {
            Loop::V4(el) => {
                before = el.pending.len();
                el.pending
                    .retain(|r| !matches!(r, rumqttc::Request::Publish(p) if p.retain && stale(&p.topic, &p.payload)));
                after = el.pending.len();
            }
            Loop::V5(el) => {
                before = el.pending.len();
                el.pending.retain(|r| {
                    !matches!(r, m5::Request::Publish(p)
                        if p.retain && stale(&String::from_utf8_lossy(&p.topic), &p.payload))
                });
                after = el.pending.len();
            }
        }
        before - after
    }

    /// Drops the network connection now; the next poll connects again.
    pub fn clean(&mut self) {
        match self {
            Loop::V4(el) => el.clean(),
            Loop::V5(el) => el.clean(),
        }
    }

    /// What a CONNECT with these options costs, with the TCP handshake before it.
    pub fn connect_len(&self) -> usize {
        let (id, will, login, props) = match self {
            Loop::V4(el) => {
                let o = &el.mqtt_options;
                let will = o.last_will().map(|w| w.topic.len() + w.message.len());
                (o.client_id().len(), will, o.credentials().map(|l| l.username.len() + l.password.len()), 0)
            }
            Loop::V5(el) => {
                let o = &el.options;
                let will = o.last_will().map(|w| w.topic.len() + w.message.len() + 1);
                // Properties: session expiry (5), maximum packet size (5), their length (1).
                (o.client_id().len(), will, o.credentials().map(|l| l.username.len() + l.password.len()), 11)
            }
        };
        let n = 10 + 2 + id + will.map_or(0, |w| 4 + w) + login.map_or(0, |l| 4 + l) + props;
        packet_len(n) + 2 * TCP_IP_OVERHEAD as usize
    }

    pub async fn poll(&mut self) -> Result<Net, PollError> {
        match self {
            Loop::V4(el) => match el.poll().await {
                Ok(ev) => Ok(net4(ev)),
                Err(e) => Err(poll_error(&e, unsupported4(&e), refusal4(&e))),
            },
            Loop::V5(el) => match el.poll().await {
                Ok(ev) => Ok(net5(ev)),
                Err(e) => Err(poll_error(&e, unsupported5(&e), refusal5(&e))),
            },
        }
    }
}

/// A TCP-level failure says nothing about the protocol; anything after the connection was made
/// (refused as an unsupported version, closed, garbled) may.
fn io_is_network(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | TimedOut | HostUnreachable | NetworkUnreachable | AddrNotAvailable | NotFound
    )
}

fn poll_error(e: &dyn std::fmt::Display, maybe_unsupported: bool, refusal: Option<String>) -> PollError {
    PollError { maybe_unsupported, refused: refusal.is_some(), message: refusal.unwrap_or_else(|| e.to_string()) }
}

/// What an operator should read when the broker refuses the client itself (Mosquitto answers a
/// wrong password under MQTT 5 with "not authorized", under 3.1.1 with "bad user name or password").
const BAD_CREDENTIALS: &str = "the broker refused the connection: wrong or missing user name or password";
const NOT_AUTHORIZED: &str =
    "the broker refused the connection (not authorized): wrong or missing user name or password";

fn refusal4(e: &rumqttc::ConnectionError) -> Option<String> {
    use rumqttc::ConnectReturnCode::*;
    match e {
        rumqttc::ConnectionError::ConnectionRefused(BadUserNamePassword) => Some(BAD_CREDENTIALS.into()),
        rumqttc::ConnectionError::ConnectionRefused(NotAuthorized) => Some(NOT_AUTHORIZED.into()),
        _ => None,
    }
}

fn refusal5(e: &m5::ConnectionError) -> Option<String> {
    use m5::mqttbytes::v5::ConnectReturnCode::*;
    match e {
        m5::ConnectionError::ConnectionRefused(BadUserNamePassword) => Some(BAD_CREDENTIALS.into()),
        m5::ConnectionError::ConnectionRefused(NotAuthorized) => Some(NOT_AUTHORIZED.into()),
        _ => None,
    }
}

fn unsupported4(e: &rumqttc::ConnectionError) -> bool {
    match e {
        rumqttc::ConnectionError::ConnectionRefused(code) => {
            *code == rumqttc::ConnectReturnCode::RefusedProtocolVersion
        }
        _ => false,
    }
}

fn unsupported5(e: &m5::ConnectionError) -> bool {
    match e {
        m5::ConnectionError::ConnectionRefused(code) => {
            *code == m5::mqttbytes::v5::ConnectReturnCode::UnsupportedProtocolVersion
        }
        m5::ConnectionError::Io(io) => !io_is_network(io),
        m5::ConnectionError::MqttState(_) | m5::ConnectionError::NotConnAck(_) => true,
        _ => false,
    }
}

fn net4(ev: rumqttc::Event) -> Net {
    use rumqttc::{Event, Outgoing, Packet};
    match ev {
        Event::Incoming(Packet::ConnAck(a)) => Net::ConnAck { session_present: a.session_present },
        Event::Incoming(Packet::Publish(p)) => Net::Publish {
            topic: p.topic,
            payload: p.payload.to_vec(),
            retain: p.retain,
            qos1: p.qos != QoS::AtMostOnce,
        },
        Event::Incoming(Packet::PingResp) => Net::PingResp,
        Event::Incoming(Packet::PubAck(_)) => Net::PubAck { refused: false },
        Event::Incoming(Packet::SubAck(s)) => Net::SubAck(s.return_codes.len()),
        Event::Incoming(Packet::UnsubAck(_)) => Net::UnsubAck,
        Event::Outgoing(Outgoing::PingReq) => Net::OutPingReq,
        Event::Outgoing(Outgoing::PubAck(_)) => Net::OutPubAck,
        Event::Outgoing(Outgoing::Disconnect) => Net::OutDisconnect,
        _ => Net::Other,
    }
}

fn net5(ev: m5::Event) -> Net {
    use m5::mqttbytes::v5::Packet;
    use m5::Event;
    use rumqttc::Outgoing;
    match ev {
        Event::Incoming(Packet::ConnAck(a)) => Net::ConnAck { session_present: a.session_present },
        Event::Incoming(Packet::Publish(p)) => Net::Publish {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload.to_vec(),
            retain: p.retain,
            qos1: p.qos != m5::mqttbytes::QoS::AtMostOnce,
        },
        Event::Incoming(Packet::PingResp(_)) => Net::PingResp,
        Event::Incoming(Packet::PubAck(a)) => {
            use m5::mqttbytes::v5::PubAckReason::{NoMatchingSubscribers, Success};
            Net::PubAck { refused: !matches!(a.reason, Success | NoMatchingSubscribers) }
        }
        Event::Incoming(Packet::SubAck(s)) => Net::SubAck(s.return_codes.len()),
        Event::Incoming(Packet::UnsubAck(_)) => Net::UnsubAck,
        Event::Outgoing(Outgoing::PingReq) => Net::OutPingReq,
        Event::Outgoing(Outgoing::PubAck(_)) => Net::OutPubAck,
        Event::Outgoing(Outgoing::Disconnect) => Net::OutDisconnect,
        _ => Net::Other,
    }
}
