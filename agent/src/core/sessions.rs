//! Remote sessions as the core sees them: whether the device allows one (`[remote]` in
//! agent.toml, never changeable over the wire), the operation's record from open to end, and
//! the orders for the edge (`remote.rs`), which moves the bytes. The core never sees a frame.

use std::collections::BTreeMap;

use debfleet_protocol::session::Direction;
use debfleet_protocol::{time, CommandArgs, ErrorCode, OpError, OpId, Topic, TrafficClass};
use serde_json::{json, Value};

use super::{Core, Out};

/// What the edge runs for a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionKind {
    Shell {
        user: String,
        cols: u16,
        rows: u16,
        term: String,
        command: Option<String>,
        raw: bool,
    },
    Forward {
        to: String,
    },
    /// `journal` with `follow`: journalctl's entries as they come.
    Follow {
        units: Vec<String>,
        since_s: Option<u64>,
        lines: u32,
    },
}

impl SessionKind {
    /// What its bytes count as on a metered link: a followed journal is logs.
    pub fn class(&self) -> TrafficClass {
        match self {
            SessionKind::Follow { .. } => TrafficClass::Logs,
            _ => TrafficClass::Result,
        }
    }
}

/// The core's orders to the edge's sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionOrder {
    /// Start a session: make this side's key, then report [`SessionEvent::Ready`].
    Open {
        id: OpId,
        peer_key: [u8; 32],
        kind: SessionKind,
        idle_timeout_s: u64,
        /// The day's data budget (bytes, 0: none) a followed journal stays within.
        budget: u64,
        /// Where the console's frames arrive, and where this side's go.
        topic_in: String,
        topic_out: String,
    },
    /// End the session now, for this reason.
    Stop { id: OpId, reason: String },
}

/// What the edge's sessions report.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// The session's key is made and it takes frames.
    Ready { id: OpId, key: [u8; 32] },
    /// The session ended: its result, or why it failed.
    Ended { id: OpId, outcome: Result<Value, OpError> },
}

/// The sessions open now.
#[derive(Debug, Default)]
pub(super) struct Sessions {
    open: BTreeMap<OpId, Value>,
}

impl Core {
    /// A `shell` or `forward` command, its operation begun: the session's order for the edge,
    /// or why this device does not open it.
    pub(super) fn open_session(&mut self, id: &OpId, args: CommandArgs) -> Result<Vec<Out>, OpError> {
        let remote = &self.cfg.remote;
        let not_supported = |message: String| OpError { code: ErrorCode::NotSupported, message };
        let (peer_key, kind, about) = match args {
            CommandArgs::Shell { key, cols, rows, term, command, raw } => {
                if !remote.shell {
                    return Err(not_supported(
                        "the remote shell is off on this device (its agent.toml must say [remote] shell = true)".into(),
                    ));
                }
                let user = remote.user.clone().unwrap_or_default();
                let about = json!({"user": user});
                (key, SessionKind::Shell { user, cols, rows, term, command, raw }, about)
            }
            CommandArgs::Forward { key, to } => {
                if !remote.forward.contains(&to) {
                    return Err(not_supported(if remote.forward.is_empty() {
                        "forwarding is off on this device (its agent.toml lists none in [remote] forward)".into()
                    } else {
                        format!("{to} is not in this device's [remote] forward list ({})", remote.forward.join(", "))
                    }));
                }
                let about = json!({"to": to});
                (key, SessionKind::Forward { to }, about)
            }
            _ => return Err(OpError { code: ErrorCode::Internal, message: "not a session".into() }),
        };
        self.start_session(id, peer_key, kind, about)
    }

    /// `journal` with `follow`: the units already checked.
    pub(super) fn open_follow(
        &mut self,
        id: &OpId,
        peer_key: [u8; 32],
        units: Vec<String>,
        since_s: Option<u64>,
        lines: u32,
    ) -> Result<Vec<Out>, OpError> {
        if !self.link.allows(TrafficClass::Logs, self.runtime.budget.bytes_per_day) {
            return Err(OpError {
                code: ErrorCode::Busy,
                message:
                    "today's data budget has no room left for logs; try again tomorrow or raise budget.bytes_per_day"
                        .into(),
            });
        }
        let about = json!({"units": units});
        self.start_session(id, peer_key, SessionKind::Follow { units, since_s, lines }, about)
    }

    fn start_session(
        &mut self,
        id: &OpId,
        peer_key: [u8; 32],
        kind: SessionKind,
        about: Value,
    ) -> Result<Vec<Out>, OpError> {
        let remote = &self.cfg.remote;
        if self.sessions.open.len() >= remote.max_sessions {
            return Err(OpError {
                code: ErrorCode::Busy,
                message: format!(
                    "{} sessions are open, the most this device allows ([remote] max_sessions)",
                    remote.max_sessions
                ),
            });
        }
        let dev = self.cfg.device_id.clone();
        let topic_in = self.topic(Topic::Session(dev.clone(), id.clone(), Direction::In));
        let topic_out = self.topic(Topic::Session(dev, id.clone(), Direction::Out));
        self.sessions.open.insert(id.clone(), about);
        Ok(vec![
            Out::Subscribe(vec![topic_in.clone()]),
            Out::Session(SessionOrder::Open {
                id: id.clone(),
                peer_key,
                kind,
                idle_timeout_s: remote.idle_timeout_s,
                budget: self.runtime.budget.bytes_per_day,
                topic_in,
                topic_out,
            }),
        ])
    }

    pub(super) fn on_session(&mut self, event: SessionEvent, now_ms: i64) -> Vec<Out> {
        match event {
            SessionEvent::Ready { id, key } => {
                let Some(about) = self.sessions.open.get(&id) else { return Vec::new() };
                let mut session = about.clone();
                session["key"] = Value::String(debfleet_protocol::signature::to_hex(&key));
                if let Err(e) = self.journal.set_result(&id, now_ms, json!({ "session": session })) {
                    tracing::error!("{e}");
                }
                tracing::info!(op = %id, by = self.journal.get(&id).and_then(|e| e.record.by.as_deref()).unwrap_or("-"), "session open");
                vec![self.publish_op(&id)]
            }
            SessionEvent::Ended { id, outcome } => {
                if self.sessions.open.remove(&id).is_none() {
                    return Vec::new();
                }
                match &outcome {
                    Ok(r) => tracing::info!(op = %id, "session ended: {r}"),
                    Err(e) => tracing::warn!(op = %id, "session ended: {}", e.message),
                }
                let finished = time::now_unix_ms().max(now_ms);
                if let Err(e) = self.journal.finish(&id, finished, outcome) {
                    tracing::error!("{e}");
                }
                let dev = self.cfg.device_id.clone();
                vec![
                    Out::Unsubscribe(vec![self.topic(Topic::Session(dev, id.clone(), Direction::In))]),
                    self.publish_op(&id),
                ]
            }
        }
    }

    /// The connection broke: sessions never outlive it (the console's frames are lost with it).
    pub(super) fn stop_sessions(&mut self, reason: &str) -> Vec<Out> {
        self.sessions
            .open
            .keys()
            .map(|id| Out::Session(SessionOrder::Stop { id: id.clone(), reason: reason.to_owned() }))
            .collect()
    }
}
