//! The bridge's ROS node, on a thread of its own: it registers with the master, keeps the
//! subscriptions and publications the plan names, and watches the master every second — a
//! master that stopped answering, or that answers without knowing this node (it was restarted
//! and forgot every registration, which ROS nodes do not notice by themselves), gets a new
//! node with everything registered again. Blocking XML-RPC never runs on the component's
//! thread, so calls and the agent's socket stay responsive while the master is away.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rosrust::api::Ros;
use rosrust::{DynamicMsg, Publisher, RawMessage, RawMessageDescription, Subscriber};
use serde_json::Value as Json;

use crate::types::MsgType;
use crate::{convert, xmlrpc};

/// One ROS topic forwarded as a stream.
#[derive(Debug, Clone, PartialEq)]
pub struct SubPlan {
    pub stream: String,
    pub topic: String,
    /// Every Nth message (1: all), then at most this many a second (0: no limit).
    pub decimate: u32,
    pub max_rate_hz: f64,
    pub fields: Vec<String>,
}

/// One ROS publication driven by commands.
#[derive(Debug, Clone)]
pub struct PubPlan {
    pub name: String,
    pub topic: String,
    pub ty: Arc<MsgType>,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub node_name: String,
    pub subs: Vec<SubPlan>,
    pub pubs: Vec<PubPlan>,
    pub max_payload: usize,
}

impl Plan {
    /// Whether the node would do the same under `other` (a configuration change elsewhere
    /// must not re-register it).
    pub fn same_as(&self, other: &Plan) -> bool {
        let pubs = |p: &Plan| -> Vec<(String, String, String)> {
            p.pubs.iter().map(|x| (x.name.clone(), x.topic.clone(), x.ty.md5sum.clone())).collect()
        };
        self.node_name == other.node_name
            && self.subs == other.subs
            && self.max_payload == other.max_payload
            && pubs(self) == pubs(other)
    }
}

/// What the node tells the component.
#[derive(Debug)]
pub enum Event {
    Sample {
        stream: String,
        value: Json,
    },
    /// The master answers (with the node's name) or not (why).
    Master(Result<String, String>),
    Warn(String),
}

/// Counters of one stream, written by ROS's callback threads.
#[derive(Debug, Default, Clone)]
pub struct StreamStats {
    pub msg_type: Option<String>,
    pub received: u64,
    pub forwarded: u64,
    /// Over the payload cap, or not decodable.
    pub dropped: u64,
    pub last_seen: Option<Instant>,
}

/// What the component's thread reads without asking the node's thread.
#[derive(Default)]
pub struct Shared {
    pub publishers: Mutex<HashMap<String, Publisher<RawMessage>>>,
    pub stats: Mutex<HashMap<String, StreamStats>>,
}

#[derive(Debug)]
pub enum PublishError {
    /// The data does not fit the type (which field, and why).
    Invalid(String),
    /// No registered publication: the master is away.
    NotConnected,
    Failed(String),
}

enum Cmd {
    Plan(Plan),
    Topics(Sender<Result<Vec<(String, String)>, String>>),
    Stop(Sender<()>),
}

pub struct Node {
    tx: Sender<Cmd>,
    pub shared: Arc<Shared>,
}

/// Called after every event, from the node's threads (a component's `Waker::wake`).
pub type Wake = Arc<dyn Fn() + Send + Sync>;

impl Node {
    pub fn start(events: Sender<Event>, waker: Wake) -> std::io::Result<Node> {
        let (tx, rx) = channel();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::Builder::new().name("ros-node".into()).spawn(move || run(rx, events, waker, s))?;
        Ok(Node { tx, shared })
    }

    pub fn plan(&self, plan: Plan) {
        let _ = self.tx.send(Cmd::Plan(plan));
    }

    /// The master's topics and their types.
    pub fn topics(&self) -> Result<Vec<(String, String)>, String> {
        let (tx, rx) = channel();
        self.tx.send(Cmd::Topics(tx)).map_err(|_| "the ROS node has stopped".to_owned())?;
        rx.recv_timeout(Duration::from_secs(5)).map_err(|_| "the ROS master did not answer in 5 s".to_owned())?
    }

    /// Publishes `data` on the plan's publisher `name` as a message of type `ty`: checked
    /// against the definition and encoded first, so nothing malformed reaches ROS. Answers how
    /// many subscribers it has.
    pub fn publish(
        &self,
        name: &str,
        ty: &MsgType,
        data: &serde_json::Map<String, Json>,
    ) -> Result<usize, PublishError> {
        let msg = convert::from_json(ty, data).map_err(PublishError::Invalid)?;
        let mut bytes = Vec::new();
        ty.codec.encode(&msg, &mut bytes).map_err(|e| PublishError::Invalid(format!("encoding {}: {e}", ty.name)))?;
        let publishers = self.shared.publishers.lock().unwrap_or_else(|e| e.into_inner());
        let publisher = publishers.get(name).ok_or(PublishError::NotConnected)?;
        let subscribers = publisher.subscriber_count();
        publisher.send(RawMessage(bytes)).map_err(|e| PublishError::Failed(e.to_string()))?;
        Ok(subscribers)
    }

    /// Unregisters from the master (waits at most 2 s: the master may be gone).
    pub fn stop(&self) {
        let (tx, rx) = channel();
        if self.tx.send(Cmd::Stop(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(2));
        }
    }
}

/// A registered node and what it holds; dropping it unregisters and stops the node's own
/// XML-RPC server (rosrust's `Ros` has no `Drop`: its threads would stay, one set per
/// reconnection).
struct Live {
    ros: Ros,
    subs: Vec<Subscriber>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.subs.clear();
        let _ = xmlrpc::call(self.ros.uri(), "shutdown", &[self.ros.name(), "replaced"], Duration::from_secs(1));
    }
}

/// Where the ROS master is: `ROS_MASTER_URI`, as for every ROS node.
pub fn master_uri() -> String {
    std::env::var("ROS_MASTER_URI").unwrap_or_else(|_| "http://localhost:11311/".into())
}

/// How long the master has to answer one of the node's own questions.
const MASTER_TIMEOUT: Duration = Duration::from_secs(2);

fn run(rx: Receiver<Cmd>, events: Sender<Event>, waker: Wake, shared: Arc<Shared>) {
    let tell = |e: Event| {
        let _ = events.send(e);
        waker();
    };
    let mut plan: Option<Plan> = None;
    let mut live: Option<Live> = None;
    let mut said: Option<Result<String, String>> = None;
    let mut next_check = Instant::now();
    loop {
        match rx.recv_timeout(next_check.saturating_duration_since(Instant::now())) {
            Ok(Cmd::Plan(p)) => {
                shared.publishers.lock().unwrap_or_else(|e| e.into_inner()).clear();
                live = None;
                shared.stats.lock().unwrap_or_else(|e| e.into_inner()).clear();
                plan = Some(p);
                next_check = Instant::now();
                continue;
            }
            Ok(Cmd::Topics(reply)) => {
                let r = match &live {
                    Some(l) => l
                        .ros
                        .topics()
                        .map(|ts| ts.into_iter().map(|t| (t.name, t.datatype)).collect())
                        .map_err(|e| format!("the ROS master: {e}")),
                    None => Err("not connected to the ROS master".to_owned()),
                };
                let _ = reply.send(r);
                continue;
            }
            Ok(Cmd::Stop(done)) => {
                shared.publishers.lock().unwrap_or_else(|e| e.into_inner()).clear();
                drop(live.take());
                let _ = done.send(());
                return;
            }
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
        next_check = Instant::now() + Duration::from_secs(1);
        let Some(plan) = &plan else { continue };
        if let Some(l) = &live {
            if let Err(why) = registered(&l.ros) {
                shared.publishers.lock().unwrap_or_else(|e| e.into_inner()).clear();
                live = None;
                let now = Err(why);
                if said.as_ref() != Some(&now) {
                    tell(Event::Master(now.clone()));
                    said = Some(now);
                }
            }
        }
        if live.is_none() {
            let now = match connect(plan, &shared, &events, &waker) {
                Ok(l) => {
                    let name = l.ros.name().to_owned();
                    live = Some(l);
                    Ok(name)
                }
                Err(e) => Err(e),
            };
            if said.as_ref() != Some(&now) {
                tell(Event::Master(now.clone()));
                said = Some(now);
            }
        }
    }
}

/// Whether the master still knows this node as this process's: a master that was restarted has
/// forgotten every registration (`lookupNode` fails), and a node of the same name started
/// elsewhere has taken the name over (another URI).
fn registered(ros: &Ros) -> Result<(), String> {
    let body = xmlrpc::call(&master_uri(), "lookupNode", &[ros.name(), ros.name()], MASTER_TIMEOUT)
        .map_err(|e| format!("the ROS master stopped answering: {e}"))?;
    if xmlrpc::status(&body) == Some(1) && body.contains(ros.uri()) {
        Ok(())
    } else {
        Err("the ROS master no longer knows this node (restarted?); registering again".to_owned())
    }
}

fn connect(plan: &Plan, shared: &Arc<Shared>, events: &Sender<Event>, waker: &Wake) -> Result<Live, String> {
    let master = master_uri();
    // Asked first with a deadline: rosrust's own calls have none, and a node it creates before
    // failing leaves its threads behind.
    xmlrpc::call(&master, "getPid", &[&format!("/{}", plan.node_name)], MASTER_TIMEOUT)
        .map_err(|e| format!("the ROS master at {master}: {e}"))?;
    let ros = Ros::new(&plan.node_name).map_err(|e| format!("the ROS master at {master}: {e}"))?;
    let mut live = Live { ros, subs: Vec::new() };
    let ros = &live.ros;
    let mut subs = Vec::new();
    for s in &plan.subs {
        subs.push(subscribe(ros, s, plan.max_payload, shared, events, waker)?);
    }
    let mut publishers = HashMap::new();
    for p in &plan.pubs {
        let desc = RawMessageDescription {
            msg_definition: p.ty.definition.clone(),
            md5sum: p.ty.md5sum.clone(),
            msg_type: p.ty.name.clone(),
        };
        let publisher = ros
            .publish_with_description::<RawMessage>(&p.topic, 16, desc)
            .map_err(|e| format!("advertising {} ({}): {e}", p.topic, p.ty.name))?;
        publishers.insert(p.name.clone(), publisher);
    }
    *shared.publishers.lock().unwrap_or_else(|e| e.into_inner()) = publishers;
    live.subs = subs;
    Ok(live)
}

/// What one subscription's callbacks share: a decoder per publishing node (each sends its own
/// definition in its connection header), and the gate's place.
#[derive(Default)]
struct Gate {
    decoders: HashMap<String, DynamicMsg>,
    seen: u64,
    /// When the rate limit lets the next message through: advanced by the period from the last
    /// due time, not from the message's arrival, so jitter does not halve the rate.
    next_due: Option<Instant>,
    /// The warnings already given, one bit per kind (each is said once).
    warned: u8,
}

const WARN_DECODE: u8 = 1;
const WARN_FIELDS: u8 = 2;
const WARN_SIZE: u8 = 4;
const WARN_NO_DECODER: u8 = 8;

impl Gate {
    fn first(&mut self, kind: u8) -> bool {
        let first = self.warned & kind == 0;
        self.warned |= kind;
        first
    }
}

fn subscribe(
    ros: &Ros,
    plan: &SubPlan,
    max_payload: usize,
    shared: &Arc<Shared>,
    events: &Sender<Event>,
    waker: &Wake,
) -> Result<Subscriber, String> {
    let gate = Arc::new(Mutex::new(Gate::default()));
    let (g1, g2) = (gate.clone(), gate);
    let (s1, s2) = (shared.clone(), shared.clone());
    let (events, waker) = (events.clone(), waker.clone());
    let p = plan.clone();
    let stream = plan.stream.clone();
    // The stats lock is taken only for counting: the component's thread reads them.
    let count = move |f: &dyn Fn(&mut StreamStats)| {
        let mut stats = s1.stats.lock().unwrap_or_else(|e| e.into_inner());
        f(stats.entry(p.stream.clone()).or_default());
    };
    let p = plan.clone();
    let on_message = move |raw: RawMessage, caller: &str| {
        let now = Instant::now();
        count(&|st| {
            st.received += 1;
            st.last_seen = Some(now);
        });
        let mut gate = g1.lock().unwrap_or_else(|e| e.into_inner());
        gate.seen += 1;
        if (gate.seen - 1) % u64::from(p.decimate.max(1)) != 0 {
            return;
        }
        if p.max_rate_hz > 0.0 {
            let period = Duration::from_secs_f64(1.0 / p.max_rate_hz);
            match gate.next_due {
                Some(due) if now < due => return,
                // After a pause the schedule starts again from now (no burst to catch up).
                Some(due) => gate.next_due = Some((due + period).max(now)),
                None => gate.next_due = Some(now + period),
            }
        }
        let warn = |gate: &mut Gate, kind: u8, msg: String| {
            if gate.first(kind) {
                let _ = events.send(Event::Warn(msg));
            }
        };
        let Some(decoder) = gate.decoders.get(caller) else {
            // rosrust may hand over a message before the connection's header.
            count(&|st| st.dropped += 1);
            warn(
                &mut gate,
                WARN_NO_DECODER,
                format!("{}: a message from {caller} before its definition; dropped", p.topic),
            );
            return;
        };
        let value = match decoder.decode(std::io::Cursor::new(raw.0)) {
            Ok(m) => convert::message_to_json(&m),
            Err(e) => {
                count(&|st| st.dropped += 1);
                warn(&mut gate, WARN_DECODE, format!("{}: a message from {caller} did not decode: {e}", p.topic));
                return;
            }
        };
        let (value, missing) = convert::select(&value, &p.fields);
        if !missing.is_empty() {
            warn(&mut gate, WARN_FIELDS, format!("{}: no field {} in its messages", p.topic, missing.join(", ")));
        }
        let size = serde_json::to_vec(&value).map(|b| b.len()).unwrap_or(usize::MAX);
        if size > max_payload {
            count(&|st| st.dropped += 1);
            warn(
                &mut gate,
                WARN_SIZE,
                format!(
                    "{}: a message of {size} bytes as JSON is over max_payload_bytes ({max_payload}); dropped (select fields)",
                    p.topic
                ),
            );
            return;
        }
        drop(gate);
        count(&|st| st.forwarded += 1);
        let _ = events.send(Event::Sample { stream: p.stream.clone(), value });
        waker();
    };
    let on_connect = move |headers: HashMap<String, String>| {
        let caller = headers.get("callerid").cloned().unwrap_or_default();
        let ty = headers.get("type").cloned();
        let mut gate = g2.lock().unwrap_or_else(|e| e.into_inner());
        match DynamicMsg::from_headers(headers) {
            Ok(d) => {
                gate.decoders.insert(caller, d);
            }
            Err(_) => {
                gate.decoders.remove(&caller);
            }
        }
        s2.stats.lock().unwrap_or_else(|e| e.into_inner()).entry(stream.clone()).or_default().msg_type = ty;
    };
    ros.subscribe_with_ids_and_headers(&plan.topic, 16, on_message, on_connect)
        .map_err(|e| format!("subscribing to {}: {e}", plan.topic))
}
