//! Commands from the console: one publish per device, or one for a whole group or the fleet,
//! then the wait for each target's final operation state.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Result};
use debfleet_protocol::signature::SignTarget;
use debfleet_protocol::{Command, CommandArgs, DeviceId, GroupName, OpId, OpRecord, Topic, Topics};
use serde_json::Value;
use tokio::time::Instant;

use crate::fleet::{Change, Fleet};
use crate::output::Spinner;
use crate::session::Session;

#[derive(Debug, Clone)]
pub enum Target {
    Devices(Vec<DeviceId>),
    Group(GroupName),
    All,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub device: DeviceId,
    pub ok: bool,
    pub rtt_ms: Option<u64>,
    pub record: Option<OpRecord>,
    /// Why it failed, when it did: the device's error, or `offline`, `unknown device`, `timed out`.
    pub error: Option<String>,
}

impl Outcome {
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "id": self.device,
            "ok": self.ok,
            "rtt_ms": self.rtt_ms,
            "state": self.record.as_ref().map(|r| r.state.as_str()),
            "result": self.record.as_ref().and_then(|r| r.result.clone()),
            "error": self.error,
            "code": self.record.as_ref().and_then(|r| r.error.as_ref()).map(|e| e.code.as_str()),
        })
    }
}

/// The shortest life a command gets (see [`send`]).
pub const EXPIRY_FLOOR: Duration = Duration::from_secs(300);

pub fn new_op_id(verb: &str) -> OpId {
    let id = format!("{verb}-{}-{:04x}", debfleet_protocol::time::now_unix_ms(), fastrand::u16(..));
    OpId::new(id).expect("generated ids are valid")
}

fn failed(device: DeviceId, why: &str) -> Outcome {
    Outcome { device, ok: false, rtt_ms: None, record: None, error: Some(why.to_owned()) }
}

/// One command for a set of targets: what every sender (console, and later the web server and
/// the rollout controller) hands to [`send`]. The arguments are the protocol's own type, so what
/// goes on the wire is exactly what the agent parses.
pub struct Request {
    pub target: Target,
    pub args: CommandArgs,
    pub timeout: Duration,
    /// How long the command stays good (None: see [`send`]).
    pub expires: Option<Duration>,
    /// Who asks (the device keeps it in the operation's record).
    pub by: Option<String>,
}

/// Sends the request and waits up to its timeout for every reachable target, with a spinner.
/// Targets that are not online are reported at once instead of being waited for.
pub async fn send_and_wait(
    session: &mut Session,
    topics: &Topics,
    fleet: &mut Fleet,
    req: &Request,
) -> Result<Vec<Outcome>> {
    let verb = req.args.verb().as_str();
    let _spinner = Spinner::start(format!("{verb}: waiting for the devices"));
    send(session, topics, fleet, req, &mut |_, _| {}).await
}

/// Sends the request, calling `on_update` with every intermediate operation record (phase and
/// percent) a device publishes, and returns each target's outcome.
pub async fn send(
    session: &mut Session,
    topics: &Topics,
    fleet: &mut Fleet,
    req: &Request,
    on_update: &mut (dyn FnMut(&DeviceId, &OpRecord) + Send),
) -> Result<Vec<Outcome>> {
    let (target, timeout) = (&req.target, req.timeout);
    let verb = req.args.verb().as_str();
    let id = new_op_id(verb);
    // A command is good while its sender waits for it (or as long as the operator said): a
    // device that gets it later (a kept session queued it while the device was away) records it
    // as expired instead of running it. By default never less than EXPIRY_FLOOR, so a device
    // clock a few minutes off does not refuse it.
    let life = req.expires.unwrap_or(timeout.max(EXPIRY_FLOOR));
    let expires_at = debfleet_protocol::time::now_unix_ms() + life.as_millis() as i64;
    let command = Command {
        id: id.clone(),
        verb: req.args.verb(),
        args: req.args.clone(),
        expires_at: Some(expires_at),
        by: req.by.clone(),
        signature: None,
    };
    let expiry_s = life.as_secs().min(u64::from(u32::MAX)) as u32;
    let candidates: Vec<DeviceId> = match target {
        Target::Devices(ids) => ids.clone(),
        Target::Group(g) => fleet.members(g),
        Target::All => fleet.devices.keys().cloned().collect(),
    };
    if candidates.is_empty() {
        match target {
            Target::Group(g) => bail!("no known device is in group {g}"),
            _ => bail!("no devices known to the broker"),
        }
    }
    let mut done: BTreeMap<DeviceId, Outcome> = BTreeMap::new();
    let mut waiting = Vec::new();
    for d in candidates {
        match fleet.devices.get(&d) {
            None => {
                done.insert(d.clone(), failed(d, "unknown device"));
            }
            Some(dev) if !dev.is_online() => {
                let why = dev.status_word();
                done.insert(d.clone(), failed(d, why));
            }
            Some(_) => waiting.push(d),
        }
    }
    let started = Instant::now();
    match target {
        Target::Devices(_) => {
            for d in &waiting {
                let payload = session.command_payload(&command, &SignTarget::Device(d.clone()));
                session
                    .publish_command(topics.name(&Topic::DeviceCmd(d.clone(), verb.into())), payload, expiry_s)
                    .await?;
            }
        }
        Target::Group(g) if !waiting.is_empty() => {
            let payload = session.command_payload(&command, &SignTarget::Group(g.clone()));
            session.publish_command(topics.name(&Topic::GroupCmd(g.clone(), verb.into())), payload, expiry_s).await?
        }
        Target::All if !waiting.is_empty() => {
            let payload = session.command_payload(&command, &SignTarget::Fleet);
            session.publish_command(topics.name(&Topic::FleetCmd(verb.into())), payload, expiry_s).await?
        }
        _ => {}
    }
    let deadline = started + timeout;
    while waiting.iter().any(|d| !done.contains_key(d)) {
        let msg = match tokio::time::timeout_at(deadline, session.recv()).await {
            Ok(m) => m?,
            Err(_) => break,
        };
        if let Change::Op(dev, op) = fleet.apply(topics, &msg.topic, &msg.payload) {
            if op != id || done.contains_key(&dev) || !waiting.contains(&dev) {
                continue;
            }
            let Some(record) = fleet.devices.get(&dev).and_then(|d| d.ops.get(&op)) else {
                continue;
            };
            on_update(&dev, record);
            if record.state.is_final() {
                let ok = record.state == debfleet_protocol::OpState::Succeeded;
                let error = record.error.as_ref().map(|e| format!("{}: {}", e.code.as_str(), e.message));
                let rtt = started.elapsed().as_millis() as u64;
                done.insert(
                    dev.clone(),
                    Outcome { device: dev, ok, rtt_ms: Some(rtt), record: Some(record.clone()), error },
                );
            }
        }
    }
    for d in waiting {
        done.entry(d.clone()).or_insert_with(|| failed(d, "timed out"));
    }
    Ok(done.into_values().collect())
}
