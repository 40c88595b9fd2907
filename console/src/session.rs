//! One console connection to the broker: connect (with a clear error when it cannot; MQTT 5, or
//! 3.1.1 when the broker refuses 5), subscribe, read the retained set to its end, publish
//! commands (with a message expiry under MQTT 5), and hand every message to the caller.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use debfleet_mqtt::{Client, Endpoint, Loop, Net, QoS, Settings};
use debfleet_protocol::limits::MAX_PACKET_BYTES;
use debfleet_protocol::Topics;
use tokio::sync::{mpsc, watch};

use crate::sync::ReadState;

/// A message as the console sees it.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    /// Delivered from the broker's retained store (as opposed to published live).
    pub retained: bool,
}

pub struct Session {
    client: Client,
    rx: mpsc::Receiver<Result<Message, Refused>>,
    client_id: String,
    prefix: String,
    broker_url: String,
    pump: tokio::task::JoinHandle<()>,
    /// Publishes handed to the client (all at QoS 1), and the broker's acknowledgements of them
    /// as the pump counts them: `close` waits until they match.
    sent: std::sync::atomic::AtomicU64,
    acked: watch::Receiver<u64>,
    /// Acknowledgements that said the broker did not take the message.
    refusals: std::sync::Arc<std::sync::atomic::AtomicU64>,
    signer: Option<std::sync::Arc<crate::keys::Signer>>,
    /// The fleet index as the last read left it.
    index: Option<crate::sync::Index>,
}

pub struct ConnectOptions<'a> {
    pub url: &'a str,
    pub ca_file: Option<&'a std::path::Path>,
    pub prefix: &'a str,
    /// Broker user name and password.
    pub credentials: Option<&'a (String, String)>,
    /// Signs every command sent through this session.
    pub signer: Option<&'a std::sync::Arc<crate::keys::Signer>>,
}

impl Session {
    pub async fn connect(opts: ConnectOptions<'_>) -> Result<Session> {
        let url = debfleet_protocol::broker::BrokerUrl::parse(opts.url).map_err(|e| anyhow!("broker {e}"))?;
        let client_id = format!("debfleet-console-{:08x}", fastrand::u32(..));
        let ca = match url.tls {
            false => None,
            true => {
                let ca_path = opts.ca_file.context("an mqtts:// broker needs --ca-file (or DEBFLEET_CA_FILE)")?;
                Some(std::fs::read(ca_path).with_context(|| format!("reading {}", ca_path.display()))?)
            }
        };
        let ep = Endpoint {
            client_id: client_id.clone(),
            host: url.host.clone(),
            port: url.port,
            ca,
            credentials: opts.credentials.cloned(),
            max_packet: MAX_PACKET_BYTES,
            channel: 1024,
        };
        let settings = Settings { keepalive_s: 30, persistent_session: false, session_expiry_s: 0 };
        // The first ConnAck (or the first error) decides whether the broker is reachable; a
        // broker that takes the connection but not MQTT 5 gets 3.1.1.
        let ep = &ep;
        let first = |level| async move {
            let (client, mut eventloop) = debfleet_mqtt::open(ep, level, settings);
            let r = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    match eventloop.poll().await {
                        Ok(Net::ConnAck { .. }) => return Ok(()),
                        Ok(_) => {}
                        Err(e) => return Err(e),
                    }
                }
            })
            .await;
            (client, eventloop, r)
        };
        let (mut client, mut eventloop, mut r) = first(5).await;
        if matches!(&r, Ok(Err(e)) if e.maybe_unsupported) {
            (client, eventloop, r) = first(4).await;
        }
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.refused => {
                return Err(anyhow!(Refused::Client(format!(
                    "{} at {} (check --broker-user and the password: debfleet broker add-user/add-device)",
                    e.message, opts.url
                ))))
            }
            Ok(Err(e)) => {
                // The embedded broker (rumqttd) refuses a password by closing the connection.
                let hint = if opts.credentials.is_some() && e.maybe_unsupported {
                    " (closed before it accepted the connection: check the user name and password)"
                } else {
                    ""
                };
                return Err(anyhow!(Unreachable(format!(
                    "cannot reach the broker at {}: {}{hint}",
                    opts.url, e.message
                ))));
            }
            Err(_) => {
                return Err(anyhow!(Unreachable(format!("no answer from the broker at {} within 5 s", opts.url))))
            }
        }
        let (tx, rx) = mpsc::channel(4096);
        let (acks, acked) = watch::channel(0);
        let refusals = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let pump = tokio::spawn(pump(eventloop, tx, acks, refusals.clone()));
        Ok(Session {
            client,
            rx,
            sent: Default::default(),
            acked,
            refusals,
            signer: opts.signer.cloned(),
            client_id,
            prefix: opts.prefix.to_owned(),
            broker_url: opts.url.to_owned(),
            pump,
            index: None,
        })
    }

    pub async fn subscribe(&self, filters: &[String]) -> Result<()> {
        self.client.subscribe_many(filters.to_vec()).await.map_err(|e| anyhow!("subscribing: {e}"))
    }

    /// At QoS 0, for a view that reads the retained set again on every connect (see
    /// `debfleet_mqtt::Client::subscribe_many_with`).
    pub async fn subscribe_view(&self, filters: &[String]) -> Result<()> {
        self.client
            .subscribe_many_with(filters.to_vec(), QoS::AtMostOnce)
            .await
            .map_err(|e| anyhow!("subscribing: {e}"))
    }

    pub async fn publish(&self, topic: String, payload: Vec<u8>, retain: bool) -> Result<()> {
        self.client.publish(topic, QoS::AtLeastOnce, retain, payload).await.map_err(|e| anyhow!("publishing: {e}"))?;
        self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// A command: under MQTT 5 the broker drops it after `expiry_s` if it could not deliver it
    /// (to a device's kept session) by then; the payload's `expires_at` says the same to the
    /// device on any protocol level.
    pub async fn publish_command(&self, topic: String, payload: Vec<u8>, expiry_s: u32) -> Result<()> {
        self.client
            .publish_expiring(topic, QoS::AtLeastOnce, false, payload, Some(expiry_s))
            .await
            .map_err(|e| anyhow!("publishing: {e}"))?;
        self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The command's payload for `target`: signed when this session has a key.
    pub fn command_payload(
        &self,
        cmd: &debfleet_protocol::Command,
        target: &debfleet_protocol::signature::SignTarget,
    ) -> Vec<u8> {
        match &self.signer {
            Some(s) => debfleet_protocol::Command { signature: Some(s.sign(cmd, target)), ..cmd.clone() }.to_payload(),
            None => cmd.to_payload(),
        }
    }

    pub async fn recv(&mut self) -> Result<Message> {
        match self.rx.recv().await {
            Some(Ok(m)) => Ok(m),
            Some(Err(refused)) => Err(anyhow!(refused)),
            None => Err(anyhow!(Unreachable("the connection to the broker was lost".into()))),
        }
    }

    /// Subscribes to `filters` and returns every retained message they match. Completion is
    /// checked, not assumed from delivery order (see `sync.rs`): the console's own marker must
    /// be back, and every device the fleet index names (or that showed up) must have its core
    /// facts in. Devices still incomplete at the deadline are named on stderr. Afterwards the
    /// index is brought up to date for the next read.
    pub async fn retained(&mut self, topics: &Topics, filters: &[String]) -> Result<Vec<Message>> {
        let marker_topic = format!("{}/console/{}/sync", self.prefix, self.client_id);
        let index_topic = topics.index();
        let mut all = filters.to_vec();
        all.push(index_topic.clone());
        all.push(marker_topic.clone());
        // At QoS 0: the retained set of a large fleet, at QoS 1, overflows the broker's
        // per-client queue (Mosquitto's max_queued_messages, 1000 by default) and the rest is
        // dropped; a console's session is clean, so QoS 1 would not outlive a reconnect anyway.
        self.subscribe_view(&all).await?;
        let nonce = format!("{:016x}", fastrand::u64(..));
        self.publish(marker_topic.clone(), nonce.clone().into_bytes(), false).await?;
        let mut out = Vec::new();
        let memory = crate::sync::memory_path(&self.broker_url, &self.prefix);
        let mut state = ReadState::remembering(memory.as_deref().and_then(crate::sync::recall));
        if filters.contains(&topics.desired_filter()) {
            state = state.with_desired();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = std::time::Instant::now();
            if state.done(now) {
                break;
            }
            let wake = state.next_check().map(tokio::time::Instant::from_std).map_or(deadline, |t| t.min(deadline));
            let msg = match tokio::time::timeout_at(wake, self.recv()).await {
                Ok(m) => m?,
                Err(_) if tokio::time::Instant::now() < deadline => continue,
                Err(_) => {
                    if state.done(std::time::Instant::now()) {
                        break;
                    }
                    let missing = state.incomplete();
                    if !state.marker_seen() {
                        return Err(anyhow!("the broker did not echo the console's marker within 10 s"));
                    }
                    let records = state.missing_desired();
                    if !records.is_empty() {
                        eprintln!(
                            "debfleet: the desired-state records {} did not arrive within 10 s (deleted, or late)",
                            records.join(", ")
                        );
                    }
                    if missing.is_empty() {
                        break;
                    }
                    let names: Vec<String> = missing.iter().map(|d| d.to_string()).collect();
                    // A device of which nothing at all arrived is taken as gone (its facts were
                    // deleted): the index written below no longer names it.
                    eprintln!(
                        "debfleet: not every retained fact of {} arrived within 10 s; what is shown of them may be incomplete",
                        names.join(", ")
                    );
                    break;
                }
            };
            if msg.topic == marker_topic {
                if msg.payload == nonce.as_bytes() {
                    state.marker(std::time::Instant::now());
                }
                continue;
            }
            if msg.topic == index_topic {
                state.index(&msg.payload);
                continue;
            }
            state.message(topics, &msg.topic, &msg.payload);
            out.push(msg);
        }
        if let Some(path) = &memory {
            crate::sync::remember(path, &state.found());
        }
        if let Some(index) = state.new_index() {
            // Best effort: a console allowed only to read cannot write it, and the next read
            // then waits the quiet period instead.
            if let Ok(payload) = serde_json::to_vec(&index) {
                let _ = self.publish(index_topic, payload, true).await;
            }
        }
        self.index = Some(state.found_index());
        Ok(out)
    }

    /// After this console wrote (`present`) or deleted a desired-state record: the index says
    /// so, for the next read to wait for it (best effort, like every index write).
    pub async fn note_desired(&mut self, topics: &Topics, record: &str, present: bool) {
        let Some(index) = &mut self.index else { return };
        let changed = if present { index.desired.insert(record.to_owned()) } else { index.desired.remove(record) };
        if changed {
            if let Ok(payload) = serde_json::to_vec(&*index) {
                let _ = self.publish(topics.index(), payload, true).await;
            }
        }
    }

    /// `close`, for sessions whose publishes are best effort (a read's fleet index).
    pub async fn disconnect(self) {
        if let Err(e) = self.close().await {
            tracing::debug!("{e:#}");
        }
    }

    /// Waits until the broker has acknowledged every publish of this session, then sends
    /// DISCONNECT. Closing the socket earlier can lose what was written last: the broker may
    /// still have acknowledgements to send, and a socket closed with unread data is reset, which
    /// makes the broker discard what it had not read yet (seen with Mosquitto: the last retained
    /// record of `debfleet desired set` never arrived).
    pub async fn close(self) -> Result<()> {
        let Session { client, rx, pump, sent, mut acked, refusals, .. } = self;
        drop(rx);
        let sent = sent.into_inner();
        let all = tokio::time::timeout(Duration::from_secs(10), acked.wait_for(|a| *a >= sent)).await;
        let confirmed = match all.map(|r| r.is_ok()) {
            Ok(true) => Ok(()),
            _ => {
                let got = *acked.borrow();
                Err(anyhow!(Unreachable(format!(
                    "the broker confirmed {got} of the {sent} messages sent; the rest may not have arrived"
                ))))
            }
        };
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), pump).await;
        if refusals.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            return Err(anyhow!(Refused::Message));
        }
        confirmed
    }
}

/// The broker could not be reached or dropped the connection (exit status 3).
#[derive(Debug)]
pub struct Unreachable(pub String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// The broker refused this console (exit status 4): its credentials, or a message its broker
/// user may not publish.
#[derive(Debug)]
pub enum Refused {
    Client(String),
    Message,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Client(why) => f.write_str(why),
            Refused::Message => f.write_str(
                "the broker refused a message this console sent (not authorized): this broker user's role does not \
                 allow it (debfleet broker add-user NAME --role operator|admin)",
            ),
        }
    }
}

impl std::error::Error for Refused {}

async fn pump(
    mut eventloop: Loop,
    tx: mpsc::Sender<Result<Message, Refused>>,
    acks: watch::Sender<u64>,
    refusals: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    loop {
        match eventloop.poll().await {
            Ok(Net::Publish { topic, payload, retain, .. }) => {
                let msg = Message { topic, payload, retained: retain };
                // Once the receiver is gone the loop keeps running only to flush the DISCONNECT.
                let _ = tx.send(Ok(msg)).await;
            }
            Ok(Net::OutDisconnect) => return,
            Ok(Net::PubAck { refused }) => {
                acks.send_modify(|n| *n += 1);
                if refused {
                    refusals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _ = tx.try_send(Err(Refused::Message));
                }
            }
            Ok(_) => {}
            // A console session is short; rather than reconnecting behind the operator's back
            // (and missing messages), it reports the loss.
            Err(_) => return,
        }
    }
}
