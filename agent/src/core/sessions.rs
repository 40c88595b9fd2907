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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::tests::{fixture_with, op_states};
    use crate::core::Event;
    use debfleet_protocol::OpState;

    fn shell(id: &str) -> Vec<u8> {
        format!(r#"{{"id":"{id}","key":"{}"}}"#, "ab".repeat(32)).into_bytes()
    }

    #[test]
    fn off_unless_the_file_says_so() {
        let mut f = fixture_with(false, "");
        let outs = f.core.on_message("debfleet/device/d1/cmd/shell", &shell("s1"), false, 0);
        let last = op_states(&outs, "s1").pop().unwrap();
        assert_eq!(last.state, OpState::Failed);
        assert_eq!(last.error.unwrap().code, ErrorCode::NotSupported);
        assert!(!outs.iter().any(|o| matches!(o, Out::Session(_))));
        let forward = format!(r#"{{"id":"f1","key":"{}","to":"127.0.0.1:80"}}"#, "ab".repeat(32));
        let outs = f.core.on_message("debfleet/device/d1/cmd/forward", forward.as_bytes(), false, 0);
        assert_eq!(op_states(&outs, "f1").pop().unwrap().error.unwrap().code, ErrorCode::NotSupported);
    }

    #[test]
    fn a_session_from_open_to_end() {
        let remote = "[remote]\nshell = true\nuser = \"kiosk\"\nmax_sessions = 1\n";
        let mut f = fixture_with(false, remote);
        let outs = f.core.on_message("debfleet/device/d1/cmd/shell", &shell("s1"), false, 0);
        assert!(outs.contains(&Out::Subscribe(vec!["debfleet/session/d1/s1/in".into()])));
        let open = outs.iter().find_map(|o| match o {
            Out::Session(SessionOrder::Open { kind, topic_out, peer_key, .. }) => {
                Some((kind.clone(), topic_out.clone(), *peer_key))
            }
            _ => None,
        });
        let (kind, topic_out, peer) = open.expect("an open order");
        assert!(matches!(kind, SessionKind::Shell { ref user, cols: 80, rows: 24, raw: false, .. } if user == "kiosk"));
        assert_eq!((topic_out.as_str(), peer), ("debfleet/session/d1/s1/out", [0xab; 32]));
        // One at a time here: the next is refused as busy, its own operation.
        let outs = f.core.on_message("debfleet/device/d1/cmd/shell", &shell("s2"), false, 0);
        assert_eq!(op_states(&outs, "s2").pop().unwrap().error.unwrap().code, ErrorCode::Busy);
        // Ready: the running record carries the device's key.
        let outs = f.core.handle(Event::Session(SessionEvent::Ready { id: OpId::new("s1").unwrap(), key: [7; 32] }), 1);
        let running = op_states(&outs, "s1").pop().unwrap();
        assert_eq!(running.state, OpState::Running);
        assert_eq!(running.result.unwrap()["session"], json!({"user": "kiosk", "key": "07".repeat(32)}));
        // The connection breaks: the session is told to stop.
        let outs = f.core.handle(Event::Disconnected { unsent: Vec::new() }, 2);
        assert!(matches!(&outs[..], [Out::Session(SessionOrder::Stop { id, .. })] if id.as_str() == "s1"));
        let ended = Err(OpError { code: ErrorCode::Interrupted, message: "the connection broke".into() });
        let outs =
            f.core.handle(Event::Session(SessionEvent::Ended { id: OpId::new("s1").unwrap(), outcome: ended }), 3);
        assert!(outs.contains(&Out::Unsubscribe(vec!["debfleet/session/d1/s1/in".into()])));
        assert_eq!(op_states(&outs, "s1").pop().unwrap().error.unwrap().code, ErrorCode::Interrupted);
        // A slot is free again.
        let outs = f.core.on_message("debfleet/device/d1/cmd/shell", &shell("s3"), false, 4);
        assert!(outs.iter().any(|o| matches!(o, Out::Session(SessionOrder::Open { .. }))));
    }

    #[test]
    fn forward_only_where_listed_and_follow_only_allowed_units() {
        let remote = "[remote]\nforward = [\"127.0.0.1:8080\"]\n";
        let mut f = fixture_with(false, remote);
        let key = "cd".repeat(32);
        let ok = format!(r#"{{"id":"f1","key":"{key}","to":"127.0.0.1:8080"}}"#);
        let outs = f.core.on_message("debfleet/device/d1/cmd/forward", ok.as_bytes(), false, 0);
        assert!(outs
            .iter()
            .any(|o| matches!(o, Out::Session(SessionOrder::Open { kind: SessionKind::Forward { .. }, .. }))));
        let other = format!(r#"{{"id":"f2","key":"{key}","to":"127.0.0.1:22"}}"#);
        let outs = f.core.on_message("debfleet/device/d1/cmd/forward", other.as_bytes(), false, 0);
        let e = op_states(&outs, "f2").pop().unwrap().error.unwrap();
        assert!(e.code == ErrorCode::NotSupported && e.message.contains("127.0.0.1:8080"), "{e:?}");
        // A followed journal needs no [remote]; its units are the journal's.
        let follow = format!(r#"{{"id":"j1","key":"{key}","follow":true,"unit":"ssh.service"}}"#);
        let outs = f.core.on_message("debfleet/device/d1/cmd/journal", follow.as_bytes(), false, 0);
        assert_eq!(op_states(&outs, "j1").pop().unwrap().error.unwrap().code, ErrorCode::InvalidValue);
        let follow = format!(r#"{{"id":"j2","key":"{key}","follow":true}}"#);
        let outs = f.core.on_message("debfleet/device/d1/cmd/journal", follow.as_bytes(), false, 0);
        let kind = outs.iter().find_map(|o| match o {
            Out::Session(SessionOrder::Open { kind, .. }) => Some(kind.clone()),
            _ => None,
        });
        assert!(matches!(&kind, Some(k @ SessionKind::Follow { .. }) if k.class() == TrafficClass::Logs), "{kind:?}");
    }
}
