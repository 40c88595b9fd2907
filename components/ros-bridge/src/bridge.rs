//! The bridge as a component: its configuration (streams, publishers, where definitions are),
//! the `publish` and `topics` actions, stale streams, and what it reports.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use debfleet_component::{
    json, ActionName, ActionSpec, CallError, Component, ComponentId, ComponentMeta, ComponentState, Ctx, Level, Map,
    ParamKind, ParamSpec, Value, CONTRACT_VERSION,
};
use serde::Deserialize;

use crate::convert;
use crate::node::{self, Event, Node, Plan, PubPlan, PublishError, SubPlan};
use crate::types::{MsgType, Registry, SrvType};

/// A ROS message as JSON may be at most this big in a command.
const MAX_DATA_BYTES: u32 = 48 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Cfg {
    node_name: String,
    msg_paths: Vec<PathBuf>,
    max_payload_bytes: usize,
    stale_after_s: u64,
    subscriptions: BTreeMap<String, SubCfg>,
    publishers: BTreeMap<String, PubCfg>,
    services: BTreeMap<String, SrvCfg>,
    service_timeout_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SrvCfg {
    service: String,
    #[serde(rename = "type")]
    srv_type: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubCfg {
    topic: String,
    #[serde(default = "one")]
    decimate: u32,
    #[serde(default)]
    max_rate_hz: f64,
    #[serde(default)]
    fields: Vec<String>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PubCfg {
    topic: String,
    #[serde(rename = "type")]
    msg_type: String,
}

/// A ROS graph name as a topic: `/a/b_c`, relative names allowed.
fn check_topic(t: &str) -> Result<(), String> {
    let ok = !t.is_empty()
        && t.len() <= 200
        && t.trim_start_matches('/').split('/').all(|p| {
            p.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{t:?} is not a ROS topic name"))
    }
}

fn check_name(what: &str, n: &str) -> Result<(), String> {
    let ok = !n.is_empty()
        && n.len() <= 64
        && n.starts_with(|c: char| c.is_ascii_alphabetic())
        && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!("{what} {n:?}: a name is letters, digits, _ and -, starting with a letter"))
    }
}

pub struct Bridge {
    cfg: Option<Cfg>,
    /// Each publisher's type, resolved when configured (so a command is checked even while
    /// the master is away).
    types: HashMap<String, Arc<MsgType>>,
    services: HashMap<String, Arc<SrvType>>,
    plan: Option<Plan>,
    node: Option<Node>,
    events: Option<Receiver<Event>>,
    master: Result<String, String>,
    stale: BTreeMap<String, bool>,
    configured_at: Instant,
}

impl Default for Bridge {
    fn default() -> Self {
        Bridge::new()
    }
}

impl Bridge {
    pub fn new() -> Bridge {
        Bridge {
            cfg: None,
            types: HashMap::new(),
            services: HashMap::new(),
            plan: None,
            node: None,
            events: None,
            master: Err("not connected yet".into()),
            stale: BTreeMap::new(),
            configured_at: Instant::now(),
        }
    }

    fn publish(&mut self, args: &Map<String, Value>) -> Result<Value, CallError> {
        let name = args.get("publisher").and_then(Value::as_str).unwrap_or_default();
        let cfg = self.cfg.as_ref().ok_or_else(|| CallError::unavailable("not configured"))?;
        let Some(p) = cfg.publishers.get(name) else {
            let names: Vec<&str> = cfg.publishers.keys().map(String::as_str).collect();
            return Err(CallError::invalid(format!(
                "no publisher {name:?} (configured: {})",
                if names.is_empty() { "none".to_owned() } else { names.join(", ") }
            )));
        };
        let ty =
            self.types.get(name).ok_or_else(|| CallError::unavailable(format!("{name}: its type is not loaded")))?;
        if let Some(declared) = args.get("type").and_then(Value::as_str) {
            if declared != ty.name {
                return Err(CallError::invalid(format!(
                    "{name} publishes {} on {}, not {declared}; nothing was published",
                    ty.name, p.topic
                )));
            }
        }
        let empty = Map::new();
        let data = match args.get("data") {
            Some(Value::Object(m)) => m,
            _ => &empty,
        };
        let node = self.node.as_ref().ok_or_else(|| CallError::unavailable("the bridge is not started"))?;
        let subscribers = node.publish(name, ty, data).map_err(|e| match e {
            PublishError::Invalid(e) => CallError::invalid(format!("{e}; nothing was published")),
            PublishError::NotConnected => CallError::unavailable(format!(
                "not connected to the ROS master ({}); nothing was published",
                self.master.as_ref().err().map_or("registering", String::as_str)
            )),
            PublishError::Failed(e) => CallError::unavailable(format!("publishing on {}: {e}", p.topic)),
        })?;
        Ok(json!({
            "request_id": args.get("request_id").cloned().unwrap_or(Value::Null),
            "publisher": name,
            "topic": p.topic,
            "type": ty.name,
            "subscribers": subscribers,
        }))
    }

    /// Calls a configured service (on the component's thread, so for at most
    /// `service_timeout_s`: one call at a time).
    fn call_service(&mut self, args: &Map<String, Value>) -> Result<Value, CallError> {
        let name = args.get("name").and_then(Value::as_str).unwrap_or_default();
        let cfg = self.cfg.as_ref().ok_or_else(|| CallError::unavailable("not configured"))?;
        let (Some(s), Some(srv)) = (cfg.services.get(name), self.services.get(name)) else {
            let names: Vec<&str> = cfg.services.keys().map(String::as_str).collect();
            return Err(CallError::invalid(format!(
                "no service {name:?} (configured: {})",
                if names.is_empty() { "none".to_owned() } else { names.join(", ") }
            )));
        };
        let empty = Map::new();
        let data = match args.get("data") {
            Some(Value::Object(m)) => m,
            _ => &empty,
        };
        let request = convert::from_json(&srv.request, data)
            .map_err(|e| CallError::invalid(format!("{e}; the service was not called")))?;
        let caller = format!("/{}_client", cfg.node_name);
        let timeout = Duration::from_secs(cfg.service_timeout_s);
        let response = crate::service::call(&node::master_uri(), &caller, &s.service, srv, &request, timeout)
            .map_err(CallError::unavailable)?;
        Ok(json!({
            "request_id": args.get("request_id").cloned().unwrap_or(Value::Null),
            "service": s.service,
            "type": srv.name,
            "response": convert::message_to_json(&response),
        }))
    }

    fn on_event(&mut self, e: Event, now: Instant, ctx: &mut Ctx) {
        match e {
            Event::Sample { stream, value } => ctx.sample(&stream, value, now),
            Event::Master(m) => {
                match &m {
                    Ok(name) => ctx.log(Level::Info, format!("registered with the ROS master as {name}")),
                    Err(why) => ctx.log(Level::Warn, why.clone()),
                }
                self.master = m;
                self.status(ctx);
            }
            Event::Warn(w) => ctx.log(Level::Warn, w),
        }
    }

    fn status(&self, ctx: &mut Ctx) {
        match &self.master {
            Ok(_) => ctx.set_status(ComponentState::Running, None),
            Err(why) => {
                ctx.set_status(ComponentState::Error, Some(format!("{why} (ROS_MASTER_URI={})", node::master_uri())))
            }
        }
    }
}

impl Component for Bridge {
    fn meta(&self) -> ComponentMeta {
        let name = |s: &str| ActionName::new(s).expect("a valid action name");
        ComponentMeta {
            v: CONTRACT_VERSION,
            component: ComponentId::new("ros-bridge").expect("a valid component id"),
            version: env!("CARGO_PKG_VERSION").into(),
            actions: vec![
                ActionSpec {
                    name: name("publish"),
                    help: "publish a message on a configured publisher's topic, checked against its type first".into(),
                    params: vec![
                        ParamSpec::required(
                            "publisher",
                            ParamKind::Text { max_len: 64 },
                            "the publisher's name in cfg",
                        ),
                        ParamSpec::optional(
                            "data",
                            ParamKind::Object { max_bytes: MAX_DATA_BYTES },
                            "the message's fields",
                        ),
                        ParamSpec::optional(
                            "type",
                            ParamKind::Text { max_len: 130 },
                            "the type the sender means (refused when it is not the publisher's)",
                        ),
                        ParamSpec::optional("request_id", ParamKind::Text { max_len: 64 }, "returned as given"),
                    ],
                },
                ActionSpec {
                    name: name("service"),
                    help: "call a configured ROS service, the request checked against its type first".into(),
                    params: vec![
                        ParamSpec::required("name", ParamKind::Text { max_len: 64 }, "the service's name in cfg"),
                        ParamSpec::optional(
                            "data",
                            ParamKind::Object { max_bytes: MAX_DATA_BYTES },
                            "the request's fields",
                        ),
                        ParamSpec::optional("request_id", ParamKind::Text { max_len: 64 }, "returned as given"),
                    ],
                },
                ActionSpec {
                    name: name("topics"),
                    help: "the ROS master's topics and their types (at most 200)".into(),
                    params: Vec::new(),
                },
            ],
            metrics: vec!["received".into(), "forwarded".into(), "dropped".into()],
        }
    }

    fn default_cfg(&self) -> Map<String, Value> {
        let Value::Object(m) = json!({
            "node_name": "debfleet_bridge",
            "msg_paths": ["/usr/share"],
            "max_payload_bytes": 16384,
            "stale_after_s": 10,
            "subscriptions": {},
            "publishers": {},
            "services": {},
            "service_timeout_s": 5,
        }) else {
            unreachable!()
        };
        m
    }

    fn configure(&mut self, cfg: &Map<String, Value>, _ctx: &mut Ctx) -> Result<(), String> {
        let c: Cfg = serde_json::from_value(Value::Object(cfg.clone())).map_err(|e| e.to_string())?;
        check_name("node_name", &c.node_name)?;
        if c.node_name.contains('-') {
            return Err("node_name: ROS names have no '-'".into());
        }
        if !(1024..=60_000).contains(&c.max_payload_bytes) {
            return Err("max_payload_bytes must be in 1024..=60000 (a component frame is at most 64 KiB)".into());
        }
        if c.stale_after_s == 0 || c.stale_after_s > 86_400 {
            return Err("stale_after_s must be in 1..=86400".into());
        }
        if c.subscriptions.len() > 32 || c.publishers.len() > 32 || c.services.len() > 32 {
            return Err("at most 32 subscriptions, 32 publishers and 32 services".into());
        }
        if c.service_timeout_s == 0 || c.service_timeout_s > 25 {
            // The agent gives a call 30 s.
            return Err("service_timeout_s must be in 1..=25".into());
        }
        let mut subs = Vec::new();
        for (name, s) in &c.subscriptions {
            check_name("subscription", name)?;
            check_topic(&s.topic).map_err(|e| format!("subscriptions.{name}: {e}"))?;
            if s.decimate == 0 || !(s.max_rate_hz >= 0.0 && s.max_rate_hz <= 1000.0) {
                return Err(format!("subscriptions.{name}: decimate must be at least 1, max_rate_hz in 0..=1000"));
            }
            for f in &s.fields {
                convert::check_path(f).map_err(|e| format!("subscriptions.{name}.fields: {e}"))?;
            }
            subs.push(SubPlan {
                stream: name.clone(),
                topic: s.topic.clone(),
                decimate: s.decimate,
                max_rate_hz: s.max_rate_hz,
                fields: s.fields.clone(),
            });
        }
        let mut registry = Registry::new(c.msg_paths.clone());
        let mut types = HashMap::new();
        let mut pubs = Vec::new();
        for (name, p) in &c.publishers {
            check_name("publisher", name)?;
            check_topic(&p.topic).map_err(|e| format!("publishers.{name}: {e}"))?;
            let ty = registry.get(&p.msg_type).map_err(|e| format!("publishers.{name}: {e}"))?;
            types.insert(name.clone(), ty.clone());
            pubs.push(PubPlan { name: name.clone(), topic: p.topic.clone(), ty });
        }
        let mut services = HashMap::new();
        for (name, s) in &c.services {
            check_name("service", name)?;
            check_topic(&s.service).map_err(|e| format!("services.{name}: {e}").replace("topic", "service"))?;
            let srv = registry.service(&s.srv_type).map_err(|e| format!("services.{name}: {e}"))?;
            services.insert(name.clone(), Arc::new(srv));
        }
        let plan = Plan { node_name: c.node_name.clone(), subs, pubs, max_payload: c.max_payload_bytes };
        self.types = types;
        self.services = services;
        self.cfg = Some(c);
        if self.plan.as_ref().is_some_and(|old| old.same_as(&plan)) {
            return Ok(());
        }
        self.stale.clear();
        self.configured_at = Instant::now();
        if let Some(node) = &self.node {
            node.plan(plan.clone());
        }
        self.plan = Some(plan);
        Ok(())
    }

    fn start(&mut self, ctx: &mut Ctx) {
        let (tx, rx) = channel();
        let waker = ctx.waker();
        match Node::start(tx, std::sync::Arc::new(move || waker.wake())) {
            Ok(node) => {
                if let Some(plan) = &self.plan {
                    node.plan(plan.clone());
                }
                self.node = Some(node);
                self.events = Some(rx);
            }
            Err(e) => ctx.set_status(ComponentState::Error, Some(format!("starting the ROS node's thread: {e}"))),
        }
        self.status(ctx);
    }

    fn stop(&mut self, ctx: &mut Ctx) {
        if let Some(node) = self.node.take() {
            node.stop();
        }
        ctx.set_status(ComponentState::Stopped, None);
    }

    fn call(&mut self, action: &str, args: &Map<String, Value>, _ctx: &mut Ctx) -> Result<Value, CallError> {
        match action {
            "publish" => self.publish(args),
            "service" => self.call_service(args),
            "topics" => {
                let node = self.node.as_ref().ok_or_else(|| CallError::unavailable("the bridge is not started"))?;
                let mut topics = node.topics().map_err(CallError::unavailable)?;
                topics.sort();
                let total = topics.len();
                topics.truncate(200);
                let list: Vec<Value> = topics.into_iter().map(|(n, t)| json!({"topic": n, "type": t})).collect();
                Ok(json!({"topics": list, "total": total}))
            }
            other => Err(CallError::new(debfleet_component::ErrorCode::UnknownAction, format!("no action {other}"))),
        }
    }

    fn state(&self) -> Map<String, Value> {
        let stats = self.node.as_ref().map(|n| n.shared.stats.lock().unwrap_or_else(|e| e.into_inner()).clone());
        let mut streams = Map::new();
        if let Some(c) = &self.cfg {
            for (name, s) in &c.subscriptions {
                let ty = stats.as_ref().and_then(|st| st.get(name)).and_then(|s| s.msg_type.clone());
                streams.insert(
                    name.clone(),
                    json!({"topic": s.topic, "type": ty, "stale": self.stale.get(name).copied().unwrap_or(false)}),
                );
            }
        }
        let publishers: Map<String, Value> = self
            .cfg
            .iter()
            .flat_map(|c| c.publishers.iter())
            .map(|(n, p)| (n.clone(), json!({"topic": p.topic, "type": p.msg_type})))
            .collect();
        let services: Map<String, Value> = self
            .cfg
            .iter()
            .flat_map(|c| c.services.iter())
            .map(|(n, s)| (n.clone(), json!({"service": s.service, "type": s.srv_type})))
            .collect();
        let Value::Object(m) = json!({
            "master": if self.master.is_ok() { "connected" } else { "unreachable" },
            "master_uri": node::master_uri(),
            "node": self.master.as_ref().ok(),
            "streams": streams,
            "publishers": publishers,
            "services": services,
        }) else {
            unreachable!()
        };
        m
    }

    fn tick(&mut self, now: Instant, ctx: &mut Ctx) -> Option<Duration> {
        let events: Vec<Event> = self.events.as_ref().map(|rx| rx.try_iter().take(1000).collect()).unwrap_or_default();
        for e in events {
            self.on_event(e, now, ctx);
        }
        // A stream is stale when nothing came for stale_after_s (counted from the start, so a
        // topic nobody publishes turns stale too).
        if let (Some(c), Some(node)) = (&self.cfg, &self.node) {
            let after = Duration::from_secs(c.stale_after_s);
            // Only the arrival times, taken under the lock: this runs at every wake.
            let seen: Vec<Option<Instant>> = {
                let stats = node.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
                c.subscriptions.keys().map(|n| stats.get(n).and_then(|st| st.last_seen)).collect()
            };
            for ((name, s), seen) in c.subscriptions.iter().zip(seen) {
                let last = seen.unwrap_or(self.configured_at);
                let stale = now.duration_since(last) >= after;
                let was = self.stale.insert(name.clone(), stale).unwrap_or(false);
                if stale && !was {
                    ctx.log(Level::Warn, format!("{name}: nothing on {} for {} s; stale", s.topic, c.stale_after_s));
                } else if !stale && was {
                    ctx.log(Level::Info, format!("{name}: {} is publishing again", s.topic));
                }
            }
        }
        Some(Duration::from_millis(500))
    }

    fn metrics(&mut self) -> BTreeMap<String, f64> {
        let Some(node) = &self.node else { return BTreeMap::new() };
        let stats = node.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        let sum = |f: fn(&crate::node::StreamStats) -> u64| stats.values().map(f).sum::<u64>() as f64;
        BTreeMap::from([
            ("received".to_owned(), sum(|s| s.received)),
            ("forwarded".to_owned(), sum(|s| s.forwarded)),
            ("dropped".to_owned(), sum(|s| s.dropped)),
        ])
    }
}
